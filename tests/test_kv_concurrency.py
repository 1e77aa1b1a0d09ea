"""The point of the plugin: in the same small KV cache, more PruMerge requests run at once.

Read from vLLM's own per-step scheduler stats (a stat logger on a real `LLMEngine`), so the
figures are exact, not sampled.
"""

from __future__ import annotations

import gc

import pytest

from tests.conftest import TINY_ENGINE_ARGS
from tests.helpers import in_process_engine
from vllm_prumerge import engine_kwargs
from vllm_prumerge.serving.stats import StepTracker, stat_logger_factory

pytestmark = pytest.mark.engine

KV_BLOCKS = 25  # 24 usable blocks of 128 tokens (+1 null block) = 3072 tokens of KV cache
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def engine_and_tracker(tiny_llava):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    tracker = StepTracker()
    args = EngineArgs(
        model=tiny_llava,
        **TINY_ENGINE_ARGS,
        num_gpu_blocks_override=KV_BLOCKS,
        disable_log_stats=False,
        **engine_kwargs("prumerge"),
    )
    with in_process_engine():
        engine = LLMEngine.from_engine_args(args, stat_loggers=[stat_logger_factory(tracker)])
    try:
        yield engine, tracker
    finally:
        engine.engine_core.shutdown()
        del engine
        gc.collect()


def _run_burst(engine, tracker, images, mode):
    from vllm import SamplingParams

    tracker.reset()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, image in enumerate(images):
        prompt = {
            "prompt": PROMPT,
            "multi_modal_data": {"image": image},
            "mm_processor_kwargs": {"prumerge": mode},
        }
        engine.add_request(f"{mode}-{i}", prompt, params)
    finished = 0
    while engine.has_unfinished_requests():
        finished += sum(out.finished for out in engine.step())
    assert finished == len(images)
    return tracker.max_generating, tracker.peak_kv_cache_usage


def test_small_kv_cache_runs_more_prumerge_requests_at_once(engine_and_tracker, scenes):
    engine, tracker = engine_and_tracker
    stock_peak, stock_kv = _run_burst(engine, tracker, scenes, "off")
    prumerge_peak, prumerge_kv = _run_burst(engine, tracker, scenes, "prumerge")
    # A stock prompt (576 image + ~14 text tokens) plus 64 generated tokens takes 6 blocks of
    # 128: at most 4 of the 8 requests fit in 24 blocks. PruMerge's (~10-90 image tokens) take
    # 1 block each, so all 8 (max_num_seqs) generate together.
    assert stock_peak <= 4
    assert prumerge_peak == len(scenes) == 8
    assert stock_kv > 0.9 > prumerge_kv
