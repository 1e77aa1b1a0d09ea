"""Per-step scheduler figures from vLLM's own stats: peak KV usage and concurrency.

vLLM hands every stat logger a `SchedulerStats` and an `IterationStats` after each engine step;
`LLMEngine.from_engine_args(..., stat_loggers=[stat_logger_factory(tracker)])` feeds them to a
:class:`StepTracker`. Used by the throughput benchmark and the KV-cache concurrency test.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StepTracker:
    """Per-step scheduler figures of the current run, fed by the engine's stat logger.

    `max_running` is the scheduler's running count, which includes requests whose prefill has
    only started (chunked prefill) and may be preempted later; `max_generating` is the most
    requests that produced a token in one step (one token per request and step: no
    speculative decoding, n = 1), i.e. the concurrency the KV cache actually sustained.
    """

    peak_kv_cache_usage: float = 0.0
    max_running: int = 0
    max_waiting: int = 0
    max_generating: int = 0
    preemptions: int = 0
    steps: int = 0

    def reset(self) -> None:
        self.peak_kv_cache_usage, self.max_running, self.max_waiting = 0.0, 0, 0
        self.max_generating = self.preemptions = self.steps = 0

    def observe(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.steps += 1
            self.peak_kv_cache_usage = max(self.peak_kv_cache_usage, scheduler_stats.kv_cache_usage)
            self.max_running = max(self.max_running, scheduler_stats.num_running_reqs)
            self.max_waiting = max(self.max_waiting, scheduler_stats.num_waiting_reqs)
        if iteration_stats is not None:
            self.preemptions += iteration_stats.num_preempted_reqs
            self.max_generating = max(self.max_generating, iteration_stats.num_generation_tokens)


def stat_logger_factory(tracker: StepTracker) -> Any:
    """A vLLM StatLoggerBase subclass (a per-engine factory) feeding `tracker` every step."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class TrackerStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            tracker.observe(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return TrackerStatLogger
