"""Shared pieces of the benchmark scripts: configurations, prompts, statistics and vLLM's load
generator (the workload: `vllm_prumerge.testing.workload`; options: `_cli`; reports: `_report`).
Imports neither vLLM nor matplotlib at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_prumerge.testing.workload import build_workload

DEFAULT_CONFIGS = "off,prumerge,prumerge+,fixed:576,fixed:288,fixed:144,fixed:64,fixed:32"
# With --frames: fixed budgets are per frame, so a large one times the frames overflows the
# context; the defaults stay within 2048 tokens for 8 frames.
DEFAULT_VIDEO_CONFIGS = "off,prumerge,prumerge+,fixed:64,fixed:16"


def default_configs(frames: int) -> str:
    """The --configs default of a workload of images (`frames` 0) or videos."""
    return DEFAULT_VIDEO_CONFIGS if frames > 0 else DEFAULT_CONFIGS


def modality(frames: int) -> str:
    """What each request sends: "video" (`frames` > 0 frames) or "image"."""
    return "video" if frames > 0 else "image"


def workloads(args: Any, warm_count: int, **options: Any) -> tuple[list, list]:
    """(the measured requests, `warm_count` others for warm-ups) of the workload options
    (--num-prompts, --seed, --images, --image-size, --frames, --video-kind); `options`: more
    of `build_workload`'s (e.g. `prompt`)."""
    workload = {"size": tuple(args.image_size), "frames": args.frames, **options}
    workload["video_kind"] = args.video_kind
    items = build_workload(args.num_prompts, args.seed, args.images, **workload)
    return items, build_workload(warm_count, args.seed, args.images, start=len(items), **workload)


def fair_settings(args: Any) -> dict[str, Any]:
    """The engine settings of every compared configuration (throughput.py's engine, serving.py's
    servers): prefix caching and the multimodal processor cache off, so every request pays for
    its whole prompt and its media (tower + reduction), one item per prompt, then the engine
    options (`engine_settings`; --engine-arg last, overriding any of these)."""
    from vllm_prumerge.testing.engine_args import engine_settings

    return {
        "seed": args.seed,
        "limit_mm_per_prompt": {modality(args.frames): 1},
        "enable_prefix_caching": False,
        "mm_processor_cache_gb": 0,
        **engine_settings(args),
    }


def placeholder_token_id(model: str, frames: int = 0) -> int:
    """The token id the checkpoint's prompts carry once per visual token of the request's image
    (`image_token_index`) or video (`video_token_index`; `frames` > 0), from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    key = f"{modality(frames)}_token_index"
    token = getattr(config, key, None)
    if token is None:
        raise ValueError(
            f"{model} takes no {modality(frames)}s (its config has no {key}; "
            f"{type(config).__name__}): use a checkpoint that takes videos, or --frames 0"
        )
    return token


def chat_prompt(model: str, frames: int = 0) -> Any:
    """The checkpoint's `ChatPrompt` for this workload: the OpenAI content format, unless the
    requests carry videos and the chat template drops video parts (then vLLM's "string" format,
    which a server must be started with: `--chat-template-content-format string`)."""
    from vllm_prumerge.testing.prompts import ChatPrompt

    chat = ChatPrompt(model)
    if frames > 0:
        placeholder_token_id(model, frames)  # a clear error for a checkpoint without video
        if chat.drops("video"):
            chat = ChatPrompt(model, content_format="string")
    return chat


def filler_token_id(tokenizer: Any) -> int:
    """An ordinary text token (" the") that stands in for visual tokens in text-equivalent
    prompts; any text token costs the same in the LLM."""
    ids = tokenizer.encode(" the", add_special_tokens=False)
    if not ids:
        raise ValueError("the tokenizer gives no token for ' the'")
    return ids[-1]


def text_equivalent_ids(prompt_token_ids: Sequence[int], image_token_id: int, filler: int) -> list:
    """The text-equivalent of an image prompt: every visual (placeholder) token replaced by
    `filler`, so the text-only prompt has exactly the image prompt's length and layout."""
    return [filler if t == image_token_id else t for t in prompt_token_ids]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One compared configuration: a display name and the value of
    `mm_processor_kwargs["prumerge"]` its requests send (a mode name or a dict of PruMergeConfig
    fields); None for `stock` (stock vLLM, no plugin)."""

    name: str
    prumerge: str | dict[str, Any] | None

    @property
    def stock(self) -> bool:
        return self.prumerge is None

    @property
    def mode(self) -> str | None:
        """The PruMerge mode (None for stock)."""
        return self.prumerge if not isinstance(self.prumerge, dict) else self.prumerge["mode"]


def parse_config(item: str, *, stock: bool = False, stock_dtypes: bool = False) -> BenchConfig:
    """One configuration of `parse_configs`."""
    lower = item.strip().lower()
    base, _, temporal = lower.partition("/")
    if temporal:  # across time first: evs[:RATE] or adaptive[:THRESHOLD]
        config = parse_config(base)
        name, _, value = temporal.partition(":")
        if name not in ("evs", "adaptive"):
            raise ValueError(f"unknown temporal setting {temporal!r}: use evs[:RATE] or adaptive")
        spec = config.prumerge
        options = {**({"mode": spec} if isinstance(spec, str) else spec), "temporal": name}
        if value:
            key = "temporal_rate" if name == "evs" else "temporal_threshold"
            options[key] = _number(value, float, f"bad temporal value in {item!r}")
        return BenchConfig(f"{config.name}/{temporal}", options)
    if (stock and lower == "stock") or (stock_dtypes and lower.startswith("stock:")):
        return BenchConfig(lower, None)
    if lower in ("off", "prumerge", "prumerge+"):
        return BenchConfig(lower, lower)
    if lower.startswith("fixed:"):
        value = lower.removeprefix("fixed:").removesuffix("s")
        options = {"mode": "fixed"}
        if "." in value:
            options["budget_ratio"] = _number(value, float, f"bad fixed budget in {item!r}")
        else:
            options["budget"] = _number(value, int, f"bad fixed budget in {item!r}")
        if lower.endswith("s"):
            options["spatial_samples"] = True
        return BenchConfig(f"fixed-{value}{'+s' if lower.endswith('s') else ''}", options)
    known = "off, prumerge, prumerge+, fixed:N, fixed:Ns (spatial samples), fixed:RATIO"
    known += ", stock" * stock + ", stock:DTYPE" * stock_dtypes
    raise ValueError(f"unknown configuration {item.strip()!r}: use {known}")


def _number(text: str, kind: type, message: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(message) from None


def parse_configs(text: str, *, stock: bool = False, stock_dtypes: bool = False) -> list:
    """`"off,prumerge,prumerge+,fixed:64,fixed:64s,prumerge+/adaptive"` -> configurations
    (names unique, each checked by PruMergeConfig). `stock`: also `stock` (stock vLLM);
    `stock_dtypes`: also `stock:DTYPE`. `fixed:N` keeps N patches by importance (+ the extra
    token), `fixed:Ns` adds PruMerge+'s spatial samples, `fixed:0.25` a fraction of the patches;
    `CONFIG/evs[:RATE]` or `CONFIG/adaptive[:THRESHOLD]` reduces videos across time first."""
    from vllm_prumerge.config import PruMergeConfig

    items = [item for item in text.split(",") if item.strip()]
    configs = [parse_config(item, stock=stock, stock_dtypes=stock_dtypes) for item in items]
    names = [c.name for c in configs]
    if not configs or len(set(names)) != len(names):
        raise ValueError(f"configurations must be non-empty and unique, got {names}")
    for spec in (c.prumerge for c in configs if not c.stock):  # now, not after the engine starts
        PruMergeConfig.from_dict({"mode": spec} if isinstance(spec, str) else spec)
    return configs


def rotated(items: Sequence[Any], repeat: int) -> list[Any]:
    """`items` in the order of round `repeat` of a comparison: shifted by one every round."""
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p95, p99 (linear interpolation, numpy's default), min, max of `values`
    (NaN when empty)."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    if not a.size:
        a = np.array([math.nan])
    stats = {"mean": a.mean(), **{f"p{q}": np.percentile(a, q) for q in (50, 90, 95, 99)}}
    return {k: float(v) for k, v in {**stats, "min": a.min(), "max": a.max()}.items()}


# --------------------------------------------------------------------------------------------
# vLLM's load generator, `vllm bench serve`, for the scripts that measure a server


def write_dataset(path: Path, requests: Sequence[list[dict[str, Any]]]) -> Path:
    """A `vllm bench serve --dataset-name custom` JSONL: one chat message's content parts per
    line (sent as they are: `--skip-tokenizer-init` applies no chat template client-side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": parts}) + "\n" for parts in requests))
    return path


def bench_serve_argv(
    base: str, model: str, dataset: Path, count: int, output_len: int, **options: Any
) -> list[str]:
    """`vllm bench serve` arguments: the `count` chat requests of `dataset` (`write_dataset`)
    to the server at `base`, at most `output_len` tokens each, greedy. `options`: `body` (more
    of the request body, e.g. mm_processor_kwargs), `ignore_eos`, `rate` (requests/s, default
    inf), `concurrency` (0: unlimited), `seed`, `result` (the path of its saved result), `quiet`
    (no progress bar), `extra` (more arguments).

    `--dataset-name custom` with `--skip-tokenizer-init` sends each line's content parts as they
    are (vLLM 0.32's `custom_image` takes no `video_url` part), but then asks for one output
    token: the output length goes in --extra-body's max_completion_tokens, which wins."""
    body = {"max_completion_tokens": output_len, **options.get("body", {})}
    argv = [
        *("--backend", "openai-chat", "--endpoint", "/v1/chat/completions"),
        *("--base-url", base, "--model", model, "--skip-tokenizer-init"),
        *("--dataset-name", "custom", "--dataset-path", str(dataset), "--disable-shuffle"),
        *("--num-prompts", str(count), "--output-len", str(output_len), "--temperature", "0"),
        *("--request-rate", str(options.get("rate", math.inf))),
        *("--seed", str(options.get("seed", 0))),
        *("--ready-check-timeout-sec", "0", "--save-detailed", "--extra-body", json.dumps(body)),
        *("--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,95,99"),
    ]
    if options.get("ignore_eos"):
        argv.append("--ignore-eos")
    if options.get("concurrency"):
        argv += ["--max-concurrency", str(options["concurrency"])]
    if (result := options.get("result")) is not None:
        argv += ["--save-result", "--result-dir", str(result.parent)]
        argv += ["--result-filename", result.name]
    if options.get("quiet"):
        argv.append("--disable-tqdm")
    return argv + list(options.get("extra", ()))


def trust_hint(errors: Sequence[str]) -> str:
    """What to do when requests failed because the server refuses per-request options."""
    refused = "trust-request-mm-kwargs" in str(errors)
    return " (start the server with --trust-request-mm-kwargs)" if refused else ""


async def bench_serve(argv: list[str]) -> dict[str, Any]:
    """One `vllm bench serve` run, in this process: vLLM's own parser and load generator (its
    printed summary goes to stderr); returns its result, per-request lists included."""
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    with contextlib.redirect_stdout(sys.stderr):
        return await main_async(parser.parse_args(argv))
