"""Where PruMerge options live in vLLM, and how per-request options combine with the engine's.

- Model class: one PruMerge class per supported LLaVA family (:data:`ARCHITECTURES` maps the
  checkpoint's own architecture to it); `--plugin prumerge` and :func:`engine_kwargs` pick it from
  the checkpoint's config through :class:`PruMergeOverrides`, vLLM's callable `hf_overrides`.
- Engine level: the options end up in `hf_config.prumerge` in every vLLM process. A checkpoint
  may carry its own `prumerge` options in `config.json` (e.g. one converted for a fine-tuned
  PruMerge+ adapter); they are the defaults that explicit options override. The plain dict form
  `hf_overrides={"architectures": [ARCHITECTURES[arch]], "prumerge": {...}}` works too (e.g.
  `--hf-overrides` where `--plugin` is not available).
- Tower precision (engine level only): `hf_config.prumerge_tower_dtype` (`auto`, the default, or
  a dtype name; see :mod:`vllm_prumerge.vision.precision`), set by `--prumerge-tower-dtype`,
  `engine_kwargs(tower_dtype=...)` or the dict form's `"prumerge_tower_dtype"` key. It is a
  property of the machine the front end runs on, not of a request: a request naming it is refused.
- Tower threads (engine level only): `hf_config.prumerge_tower_threads` (`auto`, the default, or
  a positive integer; see :func:`vllm_prumerge.encoder.choose_tower_threads`), set by
  `--prumerge-tower-threads`, `engine_kwargs(tower_threads=...)` or the dict form's
  `"prumerge_tower_threads"` key; the environment variable `VLLM_PRUMERGE_TOWER_THREADS`
  overrides it. `auto` reads how many API-server processes share the machine from
  `hf_config.prumerge_api_server_count`, which the CLI hook sets from vLLM's engine arguments.
- Request level: `mm_processor_kwargs={"prumerge": {...}}` (or just a mode string,
  `{"prumerge": "prumerge+"}`); vLLM puts these kwargs into the processor-cache key, so
  features computed for one mode are never served to a request that asked for another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vllm_prumerge.config import PruMergeConfig

# The tower-option parsers (`encoder.parse_tower_threads`, `precision.parse_tower_dtype`) are
# imported where they are called: their modules load torch, and importing this module (and so
# `vllm_prumerge`) stays light for command-line tools and `--help`.

# The checkpoint's own architecture -> the plugin's model class for that family.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "PruMergeLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "PruMergeLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "PruMergeLlavaOnevisionForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration": "PruMergeLlavaNextVideoForConditionalGeneration",
    "VideoLlavaForConditionalGeneration": "PruMergeVideoLlavaForConditionalGeneration",
}
# The checkpoint's own architecture -> the model families users know it by, and what they serve:
# the one source of the family lists in user-facing text (README, setup.cfg, the package and CLI
# help texts, docs/; tests/test_docs.py checks that each names every family).
FAMILIES = {
    "LlavaForConditionalGeneration": (("LLaVA-1.5", "images"), ("LLaVA-Interleave", "images")),
    "LlavaNextForConditionalGeneration": (("LLaVA-NeXT", "images"),),
    "LlavaOnevisionForConditionalGeneration": (("LLaVA-OneVision", "images and videos"),),
    "LlavaNextVideoForConditionalGeneration": (("LLaVA-NeXT-Video", "videos"),),
    "VideoLlavaForConditionalGeneration": (("Video-LLaVA", "images and videos"),),
}


def family_names() -> list[str]:
    """Every supported family's name, in :data:`FAMILIES`' order."""
    return [name for families in FAMILIES.values() for name, _ in families]


# LLaVA-1.5's, the first family; kept as a name for users of the dict form.
ARCHITECTURE = ARCHITECTURES["LlavaForConditionalGeneration"]
CONFIG_KEY = "prumerge"
# The engine's `download_dir` (`--download-dir`) on the HF config, for the pre-processor's tower:
# vLLM's processing context carries the model config only.
DOWNLOAD_DIR_KEY = "prumerge_download_dir"
# Marks vLLM's start-up dummy inputs (memory profiling): they get worst-case-length features
# without running the tower, so no process loads the tower just to profile.
PROFILE_KEY = "_prumerge_profile"
# The HF config attribute with the tower-precision option, and that option's name.
TOWER_DTYPE_KEY = "prumerge_tower_dtype"
TOWER_DTYPE = "tower_dtype"
# The same for the tower's CPU thread count, and the API-server processes sharing the machine.
TOWER_THREADS_KEY = "prumerge_tower_threads"
TOWER_THREADS = "tower_threads"
API_SERVERS_KEY = "prumerge_api_server_count"
# Engine-level options: a request naming one is refused.
ENGINE_ONLY = {TOWER_DTYPE: "--prumerge-tower-dtype", TOWER_THREADS: "--prumerge-tower-threads"}

# Options that only make sense in fixed mode; dropped when a request switches to another mode.
_FIXED_ONLY = ("budget", "budget_ratio", "spatial_samples")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no PruMerge model class."""


def resolve_architecture(architectures: list[str] | None) -> str:
    """The PruMerge model class for a checkpoint's `architectures` (already ours: unchanged)."""
    for name in architectures or ():
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
        if name in ARCHITECTURES.values():
            return name
    supported = ", ".join(ARCHITECTURES)
    raise UnsupportedModelError(
        f"vllm-prumerge: no PruMerge model for architectures {list(architectures or [])}; "
        f"supported: {supported}"
    )


@dataclasses.dataclass(frozen=True)
class PruMergeOverrides:
    """vLLM's callable `hf_overrides`: selects the family's PruMerge class, sets the options.

    Applied by vLLM to the checkpoint's HF config right after loading it, in the process that
    builds the engine config; the result travels to every other process with that config.
    Picklable (a module-level frozen dataclass of plain values).

    Attributes:
        options: explicit PruMerge options (validated partial dict); they override the
            checkpoint's own `prumerge` options, which override the defaults.
        extra: any other `hf_overrides` keys the user gave (applied first, as vLLM would).
        download_dir: the engine's `download_dir`, set by the plugin when the engine config is
            built, so the pre-processor reads the tower from the cache the engine loads from.
        tower_dtype: the tower-precision option (validated), or None to keep the checkpoint
            config's (``auto`` when it has none).
        tower_threads: the tower-threads option (validated), or None to keep the checkpoint
            config's (``auto`` when it has none).
        api_server_count: how many API-server processes the engine has (set by the plugin when
            the engine config is built; None: one).
    """

    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    download_dir: str | None = None
    tower_dtype: str | None = None
    tower_threads: str | int | None = None
    api_server_count: int | None = None

    def __call__(self, hf_config: Any) -> Any:
        if list(getattr(hf_config, "architectures", None) or []) == [""]:
            # vLLM first probes callable overrides with a dummy config (to see whether they
            # change model_type); ours never does.
            return hf_config
        for key, value in self.extra.items():
            if isinstance(value, Mapping) and hasattr(hf_config, key):
                sub = getattr(hf_config, key)
                if hasattr(sub, "update"):
                    sub.update(dict(value))
                    continue
            setattr(hf_config, key, value)
        hf_config.architectures = [resolve_architecture(hf_config.architectures)]
        # Explicit options override the checkpoint's own freely (its max_tokens included).
        options = dict(self.options) or None
        config = request_config(engine_config(hf_config), options, ceiling=False)
        setattr(hf_config, CONFIG_KEY, config.to_dict())
        if self.download_dir is not None:
            setattr(hf_config, DOWNLOAD_DIR_KEY, self.download_dir)
        if self.tower_dtype is not None:
            setattr(hf_config, TOWER_DTYPE_KEY, self.tower_dtype)
        if self.tower_threads is not None:
            setattr(hf_config, TOWER_THREADS_KEY, self.tower_threads)
        if self.api_server_count is not None:
            setattr(hf_config, API_SERVERS_KEY, self.api_server_count)
        tower_dtype_setting(hf_config)  # a bad value from the dict form fails here
        tower_threads_setting(hf_config)
        return hf_config


def engine_kwargs(mode: str | None = None, **options: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` that serve a LLaVA-family checkpoint with PruMerge.

    `LLM(model="llava-hf/llava-1.5-7b-hf", **engine_kwargs("prumerge+"))`. The model class is
    picked from the checkpoint's own architecture (LLaVA-1.5 / LLaVA-Interleave, LLaVA-NeXT,
    LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA); another architecture fails with a
    ValueError naming the supported ones. `mode` and `options` are any
    :class:`~vllm_prumerge.config.PruMergeConfig` fields, validated here, so a typo fails before
    the engine starts; unset ones come from the checkpoint's own `prumerge` config if it has
    one, else the defaults. Images are reduced per image (per crop on LLaVA-NeXT / OneVision),
    videos per frame (after the `temporal` stage, if set: ``"evs"`` / ``"adaptive"``);
    `max_tokens` caps every image, crop and frame, and the bounds vLLM profiles with.
    `tower_dtype` (engine level only): the vision tower's compute dtype,
    ``"auto"`` (default: the model dtype, or float32 on a CPU without native arithmetic for it)
    or ``"float32"`` / ``"bfloat16"`` / ``"float16"``. `tower_threads` (engine level only): the
    tower's torch threads on a CPU, ``"auto"`` (default: the cores this process may run on, see
    :func:`vllm_prumerge.encoder.choose_tower_threads`) or a positive integer. Your own
    `hf_overrides` (a dict) go in `hf_overrides=`.
    """
    from vllm_prumerge.encoder import parse_tower_threads
    from vllm_prumerge.vision.precision import parse_tower_dtype

    hf_overrides = options.pop("hf_overrides", None) or {}
    if not isinstance(hf_overrides, Mapping):
        raise TypeError("engine_kwargs(hf_overrides=...) must be a dict")
    tower_dtype = options.pop(TOWER_DTYPE, None)
    if tower_dtype is not None:
        tower_dtype = parse_tower_dtype(tower_dtype)
    tower_threads = options.pop(TOWER_THREADS, None)
    if tower_threads is not None:
        tower_threads = parse_tower_threads(tower_threads)
    given = dict(options) if mode is None else {"mode": mode, **options}
    PruMergeConfig.from_dict(given)  # validate now; merged with the checkpoint's later
    overrides = PruMergeOverrides(
        options=given,
        extra=dict(hf_overrides),
        tower_dtype=tower_dtype,
        tower_threads=tower_threads,
    )
    return {"hf_overrides": overrides}


def tower_dtype_setting(hf_config: Any) -> str:
    """The tower-precision option carried by the model's HF config (``auto`` when absent)."""
    from vllm_prumerge.vision.precision import parse_tower_dtype

    return parse_tower_dtype(getattr(hf_config, TOWER_DTYPE_KEY, None) or "auto")


def tower_threads_setting(hf_config: Any) -> str | int:
    """The tower-threads option carried by the model's HF config (``auto`` when absent)."""
    from vllm_prumerge.encoder import parse_tower_threads

    value = getattr(hf_config, TOWER_THREADS_KEY, None)
    return parse_tower_threads("auto" if value is None else value)


def api_server_count(hf_config: Any) -> int:
    """How many API-server processes the engine has, as the plugin recorded it (1 when absent)."""
    value = getattr(hf_config, API_SERVERS_KEY, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def engine_config(hf_config: Any) -> PruMergeConfig:
    """The engine-level config carried by the model's HF config (defaults when absent)."""
    value = getattr(hf_config, CONFIG_KEY, None)
    if value is None:
        return PruMergeConfig()
    if isinstance(value, str):
        return PruMergeConfig(mode=value)
    return PruMergeConfig.from_dict(value)


def request_config(
    engine: PruMergeConfig, value: object, *, ceiling: bool = True
) -> PruMergeConfig:
    """Combine a request's `mm_processor_kwargs["prumerge"]` with the engine's config.

    Fields the request gives override the engine's; when the request switches to a non-fixed
    mode, the engine's fixed-budget fields are dropped, and when it switches to ``off`` the
    engine's ``temporal`` setting too (stock video). The engine's ``max_tokens`` is a ceiling: a
    request may lower it, not raise or remove it, nor switch to ``off``; `ceiling=False` (engine
    options over a checkpoint's own, which may set anything) drops it instead when switching to
    ``off``. Raises ValueError naming the bad field.
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
    for name, flag in ENGINE_ONLY.items():
        if name in value:
            raise ValueError(
                f"{name} is an engine-level option (the vision tower is built once per "
                f"server): set it with {flag} or engine_kwargs({name}=...), "
                f"not in mm_processor_kwargs['{CONFIG_KEY}']"
            )
    merged = engine.to_dict()
    requested = dict(value)
    mode = str(requested.get("mode", "")).strip().lower()
    if "mode" in requested and mode != "fixed":
        for name in _FIXED_ONLY:
            merged.pop(name, None)
    limit = engine.max_tokens if ceiling else None
    if mode == "off":
        if limit is not None:
            raise ValueError(
                f"mode 'off' (the family's stock count) is not available on this engine: its "
                f"max_tokens ceiling ({limit} per image, crop or frame) bounds every request"
            )
        merged.pop("temporal", None)  # stock video: the engine's temporal stage does not apply
        merged.pop("max_tokens", None)
    if "budget" in requested:
        merged.pop("budget_ratio", None)
    if "budget_ratio" in requested:
        merged.pop("budget", None)
    merged.update(requested)
    config = PruMergeConfig.from_dict(merged)
    if limit is not None and (config.max_tokens is None or config.max_tokens > limit):
        raise ValueError(
            f"max_tokens: this engine's ceiling is {limit} per image, crop or frame (vLLM "
            f"sized its memory for it); a request may lower it, not raise or remove it "
            f"(got {config.max_tokens})"
        )
    return config


def describe(config: PruMergeConfig) -> str:
    """One line for logs: `mode=prumerge iqr_multiplier=1.5 ...` (unset options omitted)."""
    return " ".join(f"{k}={v}" for k, v in config.to_dict().items() if v is not None)
