"""Command-line plumbing of the benchmarks and examples: `--engine-arg KEY=VALUE` and which
checkpoint to load (a hub id, a local folder, or a generated one).

The one home of these for benchmarks, examples and tests. Nothing here imports vLLM, so `--help`
and input errors stay instant.
"""

from __future__ import annotations

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
