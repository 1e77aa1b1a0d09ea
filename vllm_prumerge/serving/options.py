"""Where PruMerge options live in vLLM, and how per-request options combine with the engine's.

- Engine level: `hf_overrides={"architectures": [ARCHITECTURE], "prumerge": {...}}` (written by
  `--plugin prumerge` or :func:`engine_kwargs`); the dict becomes `hf_config.prumerge` in every
  vLLM process.
- Request level: `mm_processor_kwargs={"prumerge": {...}}` (or just a mode string,
  `{"prumerge": "prumerge+"}`); vLLM puts these kwargs into the processor-cache key, so
  features computed for one mode are never served to a request that asked for another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_prumerge.config import PruMergeConfig

ARCHITECTURE = "PruMergeLlavaForConditionalGeneration"
CONFIG_KEY = "prumerge"
# Marks vLLM's start-up dummy inputs (memory profiling): they get worst-case-length features
# without running the tower, so no process loads the tower just to profile.
PROFILE_KEY = "_prumerge_profile"

# Options that only make sense in fixed mode; dropped when a request switches to another mode.
_FIXED_ONLY = ("budget", "budget_ratio", "spatial_samples")


def engine_kwargs(mode: str = "prumerge", **options: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` that serve a LLaVA checkpoint with PruMerge.

    `LLM(model="llava-hf/llava-1.5-7b-hf", **engine_kwargs("prumerge+"))`. `options` are any
    :class:`~vllm_prumerge.config.PruMergeConfig` fields; they are validated here, so a typo
    fails before the engine starts. To combine with your own `hf_overrides`, merge the dicts.
    """
    config = PruMergeConfig.from_dict({"mode": mode, **options})
    return {"hf_overrides": {"architectures": [ARCHITECTURE], CONFIG_KEY: config.to_dict()}}


def engine_config(hf_config: Any) -> PruMergeConfig:
    """The engine-level config carried by the model's HF config (defaults when absent)."""
    value = getattr(hf_config, CONFIG_KEY, None)
    if value is None:
        return PruMergeConfig()
    if isinstance(value, str):
        return PruMergeConfig(mode=value)
    return PruMergeConfig.from_dict(value)


def request_config(engine: PruMergeConfig, value: object) -> PruMergeConfig:
    """Combine a request's `mm_processor_kwargs["prumerge"]` with the engine's config.

    Fields the request gives override the engine's; when the request switches to a non-fixed
    mode, the engine's fixed-budget fields are dropped. Raises ValueError naming the bad field.
    """
    if value is None:
        return engine
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"mm_processor_kwargs['{CONFIG_KEY}'] must be a mode name or an object of "
            f"PruMerge options, got {type(value).__name__}"
        )
    merged = engine.to_dict()
    requested = dict(value)
    if "mode" in requested and str(requested["mode"]).strip().lower() != "fixed":
        for name in _FIXED_ONLY:
            merged.pop(name, None)
    if "budget" in requested:
        merged.pop("budget_ratio", None)
    if "budget_ratio" in requested:
        merged.pop("budget", None)
    merged.update(requested)
    return PruMergeConfig.from_dict(merged)


def describe(config: PruMergeConfig) -> str:
    """One line for logs: `mode=prumerge iqr_multiplier=1.5 ...` (unset options omitted)."""
    return " ".join(f"{k}={v}" for k, v in config.to_dict().items() if v is not None)
