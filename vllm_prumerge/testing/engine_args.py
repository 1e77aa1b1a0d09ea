"""Command-line plumbing of the benchmarks and examples: the vLLM engine options (one group, one
set of defaults), `--engine-arg KEY=VALUE` and which checkpoint to load (a hub id, a local
folder, or a generated one).

The one home of these for benchmarks, examples and tests. Nothing here imports vLLM, so `--help`
and input errors stay instant.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any


def add_engine_arg_option(parser: Any, target: str = "vllm.LLM keyword") -> None:
    """`--engine-arg KEY=VALUE` (repeatable) on an argparse parser or group; `target` names
    what the keys are (e.g. "vllm EngineArgs field")."""
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"Any other {target}, repeatable; VALUE is parsed as JSON when it parses "
        "(e.g. --engine-arg gpu_memory_utilization=0.8 --engine-arg seed=1).",
    )


def parse_engine_arg(item: str) -> tuple[str, Any]:
    """`"KEY=VALUE"` -> (KEY, VALUE parsed as JSON, else the string); ValueError without `=`
    or with an empty key."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--engine-arg expects KEY=VALUE, got {item!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_engine_args(items: Iterable[str]) -> dict[str, Any]:
    """Every `--engine-arg` as keyword arguments (a later KEY wins)."""
    return dict(parse_engine_arg(item) for item in items)


def resolve_model(model: str | None, spec: Any = None) -> str:
    """The checkpoint to load: `model` (a hub id or a local folder) as given, else the
    generated checkpoint of `spec` (a TinyLlavaSpec; default: the tiny LLaVA-1.5), made once and
    cached in ~/.cache/vllm-prumerge (or $VLLM_PRUMERGE_CACHE)."""
    if model:
        return model
    from vllm_prumerge.testing.checkpoint import cached_tiny_llava

    return str(cached_tiny_llava(spec))


# --- The engine settings every benchmark and example takes ---------------------------------
# One set of defaults. The one deliberate difference is --max-num-seqs: the throughput and
# serving benchmarks keep 64 requests in flight so that the KV cache, not the scheduler, limits
# concurrency; quality.py leaves it to vLLM; the examples run 8 (a few prompts, a small batch).
MAX_NUM_SEQS = 64
VLLM_OWN = "vLLM's own"


def add_engine_arguments(
    parser: Any,
    *,
    max_num_seqs: int | None = MAX_NUM_SEQS,
    kv_cache: bool = False,
    title: str = "vLLM engine",
    target: str = "vllm.LLM keyword",
) -> Any:
    """The "vLLM engine" group: `--dtype`, `--max-model-len`, `--max-num-seqs`,
    `--enforce-eager`, with `kv_cache` also `--kv-cache-tokens`, `--block-size` and
    `--max-num-batched-tokens` (a fixed KV cache, for benchmarks), and `--engine-arg`;
    returns the group. `engine_settings(args)` turns them into engine keyword arguments."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "--dtype",
        default="auto",
        help="Model dtype (the plugin's vision tower follows it unless --prumerge-tower-dtype "
        "says otherwise): auto = vLLM's choice (bfloat16 on a CPU, even for a float32 "
        "checkpoint; the checkpoint's own on a GPU, float16 for llava-1.5-7b-hf), float32 for "
        "exact comparisons, bfloat16 or float16. Default: auto.",
    )
    group.add_argument(
        "--max-model-len",
        type=int,
        default=2048,
        help="Context length of the engine (prompt with its visual tokens + output). Long "
        "videos or large LLaVA-NeXT / OneVision images need more. Default: 2048.",
    )
    group.add_argument(
        "--max-num-seqs",
        type=int,
        default=max_num_seqs,
        help="Most requests the scheduler runs at once (the KV cache may limit it further). "
        f"Default: {max_num_seqs or VLLM_OWN}.",
    )
    group.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Skip torch.compile and CUDA graphs (a fast start). Default: on without a GPU, "
        "where compiling would take minutes; off (compiled) with one.",
    )
    if kv_cache:
        group.add_argument(
            "--kv-cache-tokens",
            type=int,
            default=8192,
            help="KV-cache capacity in tokens (num_gpu_blocks_override = this / --block-size), "
            "the same on every device so that concurrency limits are visible and comparable; "
            "0 = sized by vLLM from memory (VLLM_CPU_KVCACHE_SPACE, --gpu-memory-utilization). "
            "Default: 8192.",
        )
        group.add_argument(
            "--block-size",
            type=int,
            default=32,
            help="KV-cache block size in tokens; small blocks make KV use follow token counts "
            "(vLLM's CPU default is 128, CUDA's 16; both accept 32). Default: 32.",
        )
        group.add_argument(
            "--max-num-batched-tokens",
            type=int,
            default=None,
            help="Token budget of one scheduler step. Default: vLLM's for the platform.",
        )
    add_engine_arg_option(group, target)
    return group


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def use_cpu_if_no_gpu() -> bool:
    """On a machine without CUDA, run vLLM on its CPU platform with a 1 GiB KV cache (vLLM
    cannot infer the device with PyPI's torch there; both variables can be set beforehand).
    Returns whether there is a GPU."""
    import os

    gpu = has_gpu()
    if not gpu:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return gpu


def engine_settings(args: Any) -> dict[str, Any]:
    """Engine keyword arguments (EngineArgs fields) of `add_engine_arguments`' options, with
    `--enforce-eager`'s default resolved (`args.enforce_eager` is set to it) and every
    `--engine-arg` applied last."""
    if args.enforce_eager is None:
        args.enforce_eager = not has_gpu()
    settings: dict[str, Any] = {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "enforce_eager": args.enforce_eager,
    }
    if args.max_num_seqs:
        settings["max_num_seqs"] = args.max_num_seqs
    if hasattr(args, "block_size"):
        settings["block_size"] = args.block_size
        if args.kv_cache_tokens:
            settings["num_gpu_blocks_override"] = max(1, args.kv_cache_tokens // args.block_size)
        if args.max_num_batched_tokens:
            settings["max_num_batched_tokens"] = args.max_num_batched_tokens
    settings.update(parse_engine_args(args.engine_arg))
    return settings


def serve_flags(settings: dict[str, Any]) -> list[str]:
    """`vllm serve` flags of engine keyword arguments: `--key-name VALUE` (dicts and lists as
    JSON), `--key-name` / `--no-key-name` for booleans."""
    flags: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            flags += [flag, text]
    return flags


def add_number_options(group: Any, *specs: tuple) -> None:
    """Options declared as a table, one (flag, type, default, help[, choices]) each."""
    for flag, kind, default, text, *choices in specs:
        choices = choices[0] if choices else None
        group.add_argument(flag, type=kind, default=default, help=text, choices=choices)
