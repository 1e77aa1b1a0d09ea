"""Which patches survive: IQR outliers of the importance scores, budgets and spatial samples.

Everything here is per image and vectorised over the batch; nothing syncs with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_prumerge.config import PruMergeConfig

__all__ = [
    "Selection",
    "attention_order",
    "cap_kept",
    "iqr_upper_fence",
    "reference_count",
    "select_tokens",
    "spatial_sample_mask",
]


class Selection(NamedTuple):
    """The kept patches of each image and their output order (all on the input's device).

    Attributes:
        kept: ``[B, N]`` bool, the kept patches (attention-selected and spatial samples).
        order: ``[B, N]`` int64, a permutation of ``0..N-1`` per image: the kept patches first,
            in output order, then the pruned ones.
        num_outliers: ``[B]`` int64, patches kept for their attention (IQR outliers after the
            ``min_tokens`` safeguard, or the fixed budget); they head the reference order.
        num_kept: ``[B]`` int64, all kept patches (``num_outliers`` + new spatial samples).
        fence: ``[B]`` float32, the IQR upper fence (NaN in ``fixed`` mode).
    """

    kept: torch.Tensor
    order: torch.Tensor
    num_outliers: torch.Tensor
    num_kept: torch.Tensor
    fence: torch.Tensor


def attention_order(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches by descending attention, ties broken by lower patch index first.

    ``torch.topk`` leaves the order of equal values unspecified; a stable descending sort pins it.

    Args:
        attention: ``[B, N]`` float importance (class or received attention).

    Returns:
        ``(values, order)``: ``[B, N]`` attention sorted descending and ``[B, N]`` int64 patch
        indices in that order.
    """
    return torch.sort(attention, dim=-1, descending=True, stable=True)


def _quantile_of_sorted(ascending: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of rows sorted ascending, bit-identical to NumPy's default.

    NumPy (>= 2, float32 input) computes ``a + (b - a) * t`` for ``t < 0.5`` and
    ``b - (b - a) * (1 - t)`` otherwise, each operation rounded to float32. Separate tensor
    operations reproduce that rounding exactly (``torch.lerp`` may fuse into an FMA).
    """
    n = ascending.shape[-1]
    position = q * (n - 1)
    below = int(position)
    above = min(below + 1, n - 1)
    t = position - below
    lo, hi = ascending[:, below], ascending[:, above]
    diff = hi - lo
    if t < 0.5:
        return lo + diff * t
    return hi - diff * (1.0 - t)


def iqr_upper_fence(sorted_ascending: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``Q3 + multiplier * (Q3 - Q1)`` per image, computed in float32 as the reference.

    Args:
        sorted_ascending: ``[B, N]`` float32 attention, each row sorted ascending.
        multiplier: the IQR multiplier (1.5 in the reference).

    Returns:
        ``[B]`` float32 fences; a patch is an outlier when its attention is strictly greater.
    """
    q1 = _quantile_of_sorted(sorted_ascending, 0.25)
    q3 = _quantile_of_sorted(sorted_ascending, 0.75)
    return q3 + (q3 - q1) * multiplier


def reference_count(count: torch.Tensor, n_patches: int) -> torch.Tensor:
    """The reference's ``int(N * (count / N))``, evaluated in float64 exactly as Python does.

    The reference turns the outlier count into a ratio and back. For N = 576 or 2304 this is
    always ``count``, but for some N (e.g. 577: count 23 -> 22) double rounding loses one token;
    we reproduce that.

    Args:
        count: ``[B]`` int64 outlier counts.
        n_patches: N.

    Returns:
        ``[B]`` int64.
    """
    ratio = count.to(torch.float64) / n_patches
    return torch.floor(ratio * n_patches).to(torch.int64)


def spatial_sample_mask(num_selected: torch.Tensor, n_patches: int) -> torch.Tensor:
    """PruMerge+'s spatially uniform samples, exactly as the reference's adaptive branch.

    With ``r = n / N`` (``n`` = the attention-selected count), the reference samples
    ``range(0, N - 1, int(int(1 / r) / 3))`` (its literal 575 is ``N - 1`` for N = 576: the last
    patch is never sampled). Evaluated in float64 exactly as Python floats do.

    Where the reference crashes we define:
    - ``r > 1/3`` (stride ``0``): stride 1, i.e. every patch but the last is sampled. This
      continues the stride of ``1/4 < r <= 1/3``, which is already 1.
    - ``n = 0`` (only when ``min_tokens = 0``; ``int(1/0)``): only patch 0 is sampled, the limit
      of the reference's formula as ``r -> 0``.

    Args:
        num_selected: ``[B]`` int64 attention-selected counts ``n``.
        n_patches: N.

    Returns:
        ``[B, N]`` bool, True at the sampled patch indices (kept tokens included).
    """
    n = num_selected.to(torch.float64).clamp(min=1.0)
    step = torch.floor(1.0 / (n / n_patches))
    stride = torch.floor(step / 3.0).to(torch.int64).clamp(min=1)
    stride = torch.where(num_selected > 0, stride, torch.full_like(stride, max(n_patches, 1)))
    index = torch.arange(n_patches, device=num_selected.device)
    return (index % stride.unsqueeze(-1) == 0) & (index < n_patches - 1)


def cap_kept(
    by_attention: torch.Tensor,
    samples: torch.Tensor,
    order_by_attention: torch.Tensor,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max_tokens`` ceiling: of the kept patches, only the ``max_tokens`` of highest
    importance stay (ties: lower patch index first, the order of :func:`attention_order`).

    Args:
        by_attention: ``[B, N]`` bool, patches kept for their importance.
        samples: ``[B, N]`` bool, spatial samples not among them.
        order_by_attention: ``[B, N]`` int64, patch indices by descending importance.
        max_tokens: the ceiling (>= 1).

    Returns:
        ``(by_attention, samples)`` restricted to the ceiling.
    """
    kept = by_attention | samples
    kept_by_rank = kept.gather(1, order_by_attention)
    within = kept_by_rank & (torch.cumsum(kept_by_rank.to(torch.int64), dim=-1) <= max_tokens)
    capped = torch.zeros_like(kept).scatter_(1, order_by_attention, within)
    return by_attention & capped, samples & capped


def select_tokens(attention: torch.Tensor, config: PruMergeConfig) -> Selection:
    """Choose the kept patches of every image and their output order.

    ``prumerge`` / ``prumerge+``: the patches whose attention is strictly above the image's own
    IQR upper fence (never pooled across the batch), taken as the reference's
    ``int(N * (n / N))`` top patches; if fewer than ``config.min_tokens``, the top
    ``min_tokens`` patches by attention instead. ``fixed``: the top ``budget`` (or
    ``int(N * budget_ratio)``) patches, at least ``min_tokens``. All counts are clipped to N.
    Then ``prumerge+`` (and ``fixed`` with ``spatial_samples``) add the spatial samples of
    :func:`spatial_sample_mask`, minus those already kept. Last, ``config.max_tokens`` caps the
    kept patches to the highest-importance ones (:func:`cap_kept`); ``num_outliers`` then counts
    the attention-selected patches left. As in the reference, the stride comes
    from the raw outlier count (before the ``int(N * (n / N))`` round trip), or from
    ``min_tokens`` when the safeguard applies, or from the budget in ``fixed`` mode.

    Output order (``config.order``): ``"reference"`` = attention-selected patches in descending
    attention (ties: lower index first), then the new samples ascending; ``"raster"`` = all kept
    patches ascending.

    Args:
        attention: ``[B, N]`` float32 importance (class or received attention).
        config: a validated :class:`PruMergeConfig` whose mode is not ``"off"``.

    Returns:
        A :class:`Selection`.
    """
    batch, n_patches = attention.shape
    device = attention.device
    values, order_by_attention = attention_order(attention)
    rank = torch.empty_like(order_by_attention).scatter_(
        1, order_by_attention, torch.arange(n_patches, device=device).expand(batch, n_patches)
    )

    if config.adaptive:
        fence = iqr_upper_fence(values.flip(-1), config.iqr_multiplier)
        count = (attention > fence.unsqueeze(-1)).sum(-1)
        selected = reference_count(count, n_patches).clamp(min=config.min_tokens)
        # The reference derives the stride from the raw ratio, not from the rounded count.
        sampling_count = count.clamp(min=config.min_tokens)
    else:
        fence = torch.full((batch,), float("nan"), device=device)
        if config.budget is not None:
            budget = config.budget
        else:
            budget = int(n_patches * config.budget_ratio)
        selected = torch.full((batch,), max(budget, config.min_tokens), device=device)
        sampling_count = selected
    selected = selected.clamp(max=n_patches).to(torch.int64)

    by_attention = rank < selected.unsqueeze(-1)
    if config.uses_spatial_samples:
        sampling_count = sampling_count.clamp(max=n_patches).to(torch.int64)
        samples = spatial_sample_mask(sampling_count, n_patches) & ~by_attention
    else:
        samples = torch.zeros_like(by_attention)
    kept = by_attention | samples
    if config.max_tokens is not None:
        by_attention, samples = cap_kept(
            by_attention, samples, order_by_attention, config.max_tokens
        )
        kept = by_attention | samples
        selected = by_attention.sum(-1)

    index = torch.arange(n_patches, device=device).expand(batch, n_patches)
    if config.order == "raster":
        key = torch.where(kept, index, index + n_patches)
    else:
        group = torch.where(by_attention, 0, torch.where(samples, 1, 2))
        key = group * n_patches + torch.where(by_attention, rank, index)
    order = torch.sort(key, dim=-1, stable=True).indices
    return Selection(
        kept=kept,
        order=order,
        num_outliers=selected,
        num_kept=kept.sum(-1),
        fence=fence,
    )
