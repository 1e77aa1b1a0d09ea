"""The one validated configuration object of PruMerge / PruMerge+ token reduction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_TEMPORAL_RATE",
    "DEFAULT_TEMPORAL_THRESHOLD",
    "IMPORTANCES",
    "MERGE_WEIGHTINGS",
    "MODES",
    "ORDERS",
    "TEMPORALS",
    "PruMergeConfig",
]

MODES = ("prumerge", "prumerge+", "fixed", "off")
MERGE_WEIGHTINGS = ("reference", "normalized")
ORDERS = ("reference", "raster")
IMPORTANCES = ("auto", "cls", "received")
TEMPORALS = ("off", "evs", "adaptive")
# `evs`: the share of a video's patches dropped (the first frame is always whole).
DEFAULT_TEMPORAL_RATE = 0.75
# `adaptive`: the cosine similarity to a patch's anchor at and above which it is dropped: the
# lowest threshold of the sweep in docs/notes/temporal-threshold.md at which no tower drops a
# patch of a new scene.
DEFAULT_TEMPORAL_THRESHOLD = 0.95

_MODE_ALIASES = {
    "prumerge": "prumerge",
    "prumerge+": "prumerge+",
    "prumerge_plus": "prumerge+",
    "prumerge-plus": "prumerge+",
    "prumergeplus": "prumerge+",
    "fixed": "fixed",
    "off": "off",
}
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
_NONE_WORDS = ("", "none", "null")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PruMergeConfig:
    """How visual tokens are reduced; validated when built, immutable afterwards.

    Every option, as users set it (keys of ``from_dict`` / the plugin's JSON config). Each
    applies to one image, one crop (LLaVA-NeXT / OneVision tiles) or one video frame at a time:
    ``N`` below is the tower's patch count per image, crop or frame (576 for CLIP-L/14-336, 729
    for SigLIP 384/14, 256 for Video-LLaVA's 224 px CLIP-L/14).

    mode (str, default ``"prumerge"``)
        ``"prumerge"``: keep the patches whose class attention is an IQR outlier (above
        ``Q3 + iqr_multiplier * (Q3 - Q1)``, per image), merge each kept token with its
        ``k_neighbors`` most key-similar patches, and append one extra token summarising every
        pruned patch (about 32 + 1 tokens of 576 for LLaVA-1.5).
        ``"prumerge+"``: as ``prumerge`` plus the reference's spatially uniform samples
        (about 144 + 1 tokens of 576): every ``int(int(N / n) / 3)``-th patch (computed as the
        reference does, via the float ratio ``n / N``), the last patch excluded. Where the
        reference's stride would be 0 (kept ratio above 1/3, reachable only through
        ``min_tokens`` or a fixed budget; the reference crashes) the stride is 1.
        ``"fixed"``: our own fixed-budget mode (not in the paper): keep the top ``budget`` (or
        ``budget_ratio * N``) patches by class attention, optionally plus spatial samples, then
        merge exactly as ``prumerge``.
        ``"off"``: no reduction; every patch feature is passed through unchanged (no extra token),
        which equals stock LLaVA's ``"default"`` feature strategy.
        Case-insensitive; ``"prumerge_plus"`` and ``"prumerge-plus"`` are aliases of
        ``"prumerge+"``. The stored value is the canonical lower-case name.
    iqr_multiplier (float >= 0, default 1.5)
        The multiplier of the interquartile range in the upper fence. Larger keeps fewer tokens.
        Adaptive modes only (ignored by ``fixed`` and ``off``).
    k_neighbors (int >= 1, default 32)
        How many most-similar patches (cosine similarity of the layer's keys) each kept token
        absorbs. Clipped to ``N - 1`` for images with fewer patches.
    merge_weighting (str, default ``"reference"``)
        ``"reference"``: merged token = ``x_i + sum_j a_j * x_j`` over its neighbours ``j`` and the
        extra token = ``sum_j a_j * x_j`` over the pruned patches, with ``a`` the raw class
        attention (unnormalised, exactly as the authors' code and their LoRA checkpoints).
        ``"normalized"``: the weighted averages the paper's text describes:
        ``(x_i + sum_j a_j x_j) / (1 + sum_j a_j)`` (centre weight 1) and
        ``sum_j a_j x_j / sum_j a_j`` for the extra token (zero if nothing was pruned or the
        pruned attention sums to 0). Keeps the tokens' scale; not what the checkpoints saw.
    order (str, default ``"reference"``)
        ``"reference"``: the attention-selected tokens in descending class attention (ties: lower
        patch index first), then the ``prumerge+`` / ``spatial_samples`` samples in ascending
        patch index, then the extra token. ``"raster"``: every kept token in ascending patch index
        (row-major spatial order), the extra token still last. Both orders hold the same tokens.
    min_tokens (int >= 0, default 1)
        The safeguard: when fewer than ``min_tokens`` patches are IQR outliers (e.g. uniform
        attention, where the reference returns only the extra token), the top ``min_tokens``
        patches by class attention are kept instead (ties: lower patch index first), so an
        image always yields at least ``min(min_tokens, N) + 1`` tokens. In ``prumerge+`` the
        spatial stride is then derived from this safeguarded count. In ``fixed`` mode it is a
        floor on the budget. The default 1 differs from the reference only when no patch is an
        outlier (2 tokens instead of the reference's lone extra token). ``0`` disables the
        safeguard: ``prumerge`` then returns just the extra token, exactly as the reference;
        ``prumerge+`` (where the reference divides by zero) samples only patch 0, the limit of
        the reference's stride as the outlier ratio goes to 0.
    budget (int >= 0 or None, default None)
        ``fixed`` mode: how many patches to keep by class attention per image, crop or frame
        (clipped to ``N``); each also gets its extra token.
    budget_ratio (float in (0, 1] or None, default None)
        ``fixed`` mode: the kept fraction of the ``N`` patches of each image, crop or frame; the
        count is ``int(N * budget_ratio)`` (rounded down,
        as the reference's fixed-ratio branch). Exactly one of ``budget`` and ``budget_ratio``
        is required in ``fixed`` mode; neither is allowed in the other modes.
    spatial_samples (bool, default False)
        ``fixed`` mode only: add PruMerge+-style spatial samples, computed from the budget
        exactly as ``prumerge+`` computes them from the outlier count. On the CLI a switch,
        ``--prumerge-spatial-samples`` (``--no-prumerge-spatial-samples``), without a value.
    importance (str, default ``"auto"``)
        Which per-patch score ranks, selects and weights the patches ("class attention" above).
        ``"cls"``: the CLS token's attention, single head over all channels, exactly as the
        reference (towers with a CLS token only: CLIP). ``"received"``: the attention each
        patch receives, ``s_j = mean_h mean_i softmax_j(q_i^h . k_j^h / sqrt(d_h))`` over the
        tower's heads and all query tokens of the scoring layer (the field's importance for
        CLS-free towers such as SigLIP; on CLIP an ablation, CLS included among the queries
        and keys, its column dropped). ``"auto"``: ``"cls"`` when the tower has a CLS token,
        else ``"received"``. Asking for ``"cls"`` on a tower without CLS is an error.
    max_tokens (int >= 1 or None, default None)
        A ceiling per image, crop or frame: at most ``max_tokens`` kept patches (the extra token
        comes on top), the highest-importance ones first. It applies last, after the IQR fence,
        the ``min_tokens`` safeguard, the fixed budget and the spatial samples: when more are
        kept, the attention-selected patches (highest importance first) fill the ceiling before
        any spatial sample, which then enter by importance too; the rest is pruned (merged as
        any pruned patch). Set at engine level it is also the bound vLLM profiles memory with
        (``max_tokens + 1`` tokens per image, crop or frame instead of ``N + 1``), so a request
        may lower it but not raise or remove it, nor switch to ``off``. Not allowed in mode
        ``"off"`` (stock), nor below ``min_tokens`` or ``budget``.
    temporal (str, default ``"off"``)
        Videos only: which patches of each frame the reduction sees. ``"off"``: every patch,
        each frame reduced on its own. ``"evs"``: vLLM's Efficient Video Sampling criterion
        (``compute_retention_mask`` with spatial merge 1 on the tower's patch features): every
        patch of frame ``t >= 2`` is ranked by ``1 - cosine`` to the same patch of frame
        ``t - 1``, the first frame is kept whole and the most changed patches fill
        ``max(N, int(T * N * (1 - temporal_rate)))`` slots of the video's ``T * N``.
        ``"adaptive"``: a patch of frame ``t >= 2`` is dropped when the cosine similarity of its
        feature to the same patch of its anchor (the last frame in which that position was kept)
        is at least ``temporal_threshold``; the first frame is whole. Then each frame's mode
        runs on its retained patches only (importance, IQR fence, PruMerge+ samples and merge
        among them; its extra token when it retained any); a frame that retained none costs 0
        tokens. Images and crops are unaffected. Not allowed in mode ``"off"`` (stock video).
    temporal_rate (float in [0, 1), default 0.75)
        ``evs`` only: the share of the video's patches dropped (vLLM's ``q``,
        ``--video-pruning-rate``). Ignored by the other ``temporal`` settings.
    temporal_threshold (float in [0, 1), default 0.95)
        ``adaptive`` only: the cosine similarity (float32, of the tower's patch features) at
        and above which a patch counts as unchanged. Higher keeps more. 1 is excluded: the
        cosine of two identical features rounds to either side of 1. Ignored by the other
        ``temporal`` settings.

    One more option is set with these but is not a field of this class, because it belongs to the
    machine the front end runs on, not to a request:

    tower_dtype (str, default ``"auto"``; engine level only)
        The dtype the plugin's vision tower computes in (it runs in the API server; the features
        handed to the engine are cast to the model dtype). ``"auto"``: the model dtype on a GPU;
        on a CPU the model dtype where the CPU computes it natively (bfloat16: ``amx_bf16`` or
        ``avx512_bf16``; float16: ``amx_fp16`` or ``avx512_fp16``), else float32. Or
        ``"float32"``, ``"bfloat16"``, ``"float16"``. Set by ``--prumerge-tower-dtype``,
        ``engine_kwargs(tower_dtype=...)`` or the ``--hf-overrides`` key
        ``prumerge_tower_dtype``; a request that sets it is refused (HTTP 400). See
        :mod:`vllm_prumerge.vision.precision`.
    """

    mode: str = "prumerge"
    iqr_multiplier: float = 1.5
    k_neighbors: int = 32
    merge_weighting: str = "reference"
    order: str = "reference"
    min_tokens: int = 1
    budget: int | None = None
    budget_ratio: float | None = None
    spatial_samples: bool = False
    importance: str = "auto"
    max_tokens: int | None = None
    temporal: str = "off"
    temporal_rate: float = DEFAULT_TEMPORAL_RATE
    temporal_threshold: float = DEFAULT_TEMPORAL_THRESHOLD

    def __post_init__(self) -> None:
        self._check_fields()
        self._check_combinations()

    def _check_fields(self) -> None:
        """Each option on its own: validated, and normalised in place (once, here)."""
        set_ = object.__setattr__  # the dataclass is frozen
        mode = self.mode
        if not isinstance(mode, str) or mode.strip().lower() not in _MODE_ALIASES:
            raise ValueError(
                f"PruMergeConfig.mode must be one of {', '.join(MODES)} "
                f"(or prumerge_plus / prumerge-plus), got {mode!r}"
            )
        set_(self, "mode", _MODE_ALIASES[mode.strip().lower()])

        if not _is_real(self.iqr_multiplier) or not math.isfinite(self.iqr_multiplier):
            raise ValueError(
                "PruMergeConfig.iqr_multiplier must be a finite number >= 0, "
                f"got {self.iqr_multiplier!r}"
            )
        if self.iqr_multiplier < 0:
            raise ValueError(
                "PruMergeConfig.iqr_multiplier must be a finite number >= 0, "
                f"got {self.iqr_multiplier!r}"
            )
        set_(self, "iqr_multiplier", float(self.iqr_multiplier))

        if not _is_int(self.k_neighbors) or self.k_neighbors < 1:
            raise ValueError(
                f"PruMergeConfig.k_neighbors must be an integer >= 1, got {self.k_neighbors!r}"
            )
        for name, allowed in (
            ("merge_weighting", MERGE_WEIGHTINGS),
            ("order", ORDERS),
            ("importance", IMPORTANCES),
            ("temporal", TEMPORALS),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value.strip().lower() not in allowed:
                raise ValueError(
                    f"PruMergeConfig.{name} must be one of {', '.join(allowed)}, got {value!r}"
                )
            set_(self, name, value.strip().lower())
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(
                f"PruMergeConfig.min_tokens must be an integer >= 0, got {self.min_tokens!r}"
            )
        if self.budget is not None and (not _is_int(self.budget) or self.budget < 0):
            raise ValueError(
                f"PruMergeConfig.budget must be an integer >= 0 or None, got {self.budget!r}"
            )
        if self.budget_ratio is not None:
            ratio = self.budget_ratio
            if not _is_real(ratio) or not math.isfinite(ratio) or not 0 < ratio <= 1:
                raise ValueError(
                    f"PruMergeConfig.budget_ratio must be a number in (0, 1] or None, got {ratio!r}"
                )
            set_(self, "budget_ratio", float(ratio))
        if not isinstance(self.spatial_samples, bool):
            raise ValueError(
                f"PruMergeConfig.spatial_samples must be a bool, got {self.spatial_samples!r}"
            )
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                "PruMergeConfig.max_tokens must be an integer >= 1 or None, "
                f"got {self.max_tokens!r}"
            )
        rate = self.temporal_rate
        if not _is_real(rate) or not math.isfinite(rate) or not 0 <= rate < 1:
            raise ValueError(
                f"PruMergeConfig.temporal_rate must be a number in [0, 1), got {rate!r}"
            )
        set_(self, "temporal_rate", float(rate))
        threshold = self.temporal_threshold
        if not _is_real(threshold) or not math.isfinite(threshold) or not 0 <= threshold < 1:
            raise ValueError(
                f"PruMergeConfig.temporal_threshold must be a number in [0, 1), got {threshold!r}"
            )
        set_(self, "temporal_threshold", float(threshold))

    def _check_combinations(self) -> None:
        """Options that depend on the mode or on each other."""
        if self.mode == "off":
            if self.temporal != "off":
                raise ValueError(
                    f"PruMergeConfig.temporal {self.temporal!r} needs a reducing mode: mode "
                    "'off' is the family's stock path, where temporal reduction does not apply"
                )
            if self.max_tokens is not None:
                raise ValueError(
                    f"PruMergeConfig.max_tokens ({self.max_tokens}) needs a reducing mode: mode "
                    "'off' is the family's stock count"
                )
        if self.max_tokens is not None:
            for name in ("min_tokens", "budget"):
                value = getattr(self, name)
                if value is not None and value > self.max_tokens:
                    raise ValueError(
                        f"PruMergeConfig.{name} ({value}) is above max_tokens ({self.max_tokens}), "
                        "the ceiling on kept patches"
                    )

        if self.mode == "fixed":
            if (self.budget is None) == (self.budget_ratio is None):
                raise ValueError(
                    "PruMergeConfig.budget / PruMergeConfig.budget_ratio: fixed mode needs "
                    f"exactly one of them, got budget={self.budget!r}, "
                    f"budget_ratio={self.budget_ratio!r}"
                )
        else:
            for name in ("budget", "budget_ratio"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"PruMergeConfig.{name} is only allowed in mode 'fixed', "
                        f"got {name}={getattr(self, name)!r} with mode {self.mode!r}"
                    )
            if self.spatial_samples:
                raise ValueError(
                    "PruMergeConfig.spatial_samples is only allowed in mode 'fixed' "
                    f"(prumerge+ always samples), got True with mode {self.mode!r}"
                )

    @property
    def enabled(self) -> bool:
        """Whether any reduction happens (``mode != "off"``)."""
        return self.mode != "off"

    @property
    def adaptive(self) -> bool:
        """Whether the kept count comes from the IQR fence (``prumerge`` / ``prumerge+``)."""
        return self.mode in ("prumerge", "prumerge+")

    @property
    def uses_spatial_samples(self) -> bool:
        """Whether PruMerge+-style spatial samples are added to the attention-selected tokens."""
        return self.mode == "prumerge+" or (self.mode == "fixed" and self.spatial_samples)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict; ``PruMergeConfig.from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> PruMergeConfig:
        """A copy with some fields changed, validated again (same rules as construction)."""
        return PruMergeConfig.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruMergeConfig:
        """Build from a mapping (JSON, CLI ``--hf-overrides``-style dicts, ``to_dict`` output).

        Unknown keys are rejected with their names. Strings are coerced the obvious way, so CLI
        and environment values work: ``"32"`` -> 32, ``"1.5"`` -> 1.5, ``"true"``/``"false"``
        (also ``yes/no/on/off/1/0``) -> bool, ``"none"``/``"null"``/``""`` -> None for
        ``budget``, ``budget_ratio`` and ``max_tokens``. Values that do not coerce raise
        ``ValueError`` naming the field.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"PruMergeConfig.from_dict expects a mapping, got {type(data)!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise ValueError(
                f"PruMergeConfig got unknown option(s): {', '.join(unknown)}; "
                f"known options: {', '.join(fields)}"
            )
        return cls(**{key: _coerce(key, value) for key, value in data.items()})


def _coerce(name: str, value: Any) -> Any:
    """Turn a CLI/JSON string into the field's type; anything else is left for validation."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if name in ("budget", "budget_ratio", "max_tokens") and text.lower() in _NONE_WORDS:
        return None
    if name in ("k_neighbors", "min_tokens", "budget", "max_tokens"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"PruMergeConfig.{name} must be an integer, got {value!r}") from None
    if name in ("iqr_multiplier", "budget_ratio", "temporal_rate", "temporal_threshold"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"PruMergeConfig.{name} must be a number, got {value!r}") from None
    if name == "spatial_samples":
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ValueError(f"PruMergeConfig.spatial_samples must be a bool, got {value!r}")
    return value
