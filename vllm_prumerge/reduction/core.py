"""The batched entry points: importance -> selection -> merge -> packed ragged output.

:func:`reduce_by_importance` is the one core: it takes per-patch importance scores from any tower
adapter (CLS attention for CLIP, received attention for CLS-free towers such as SigLIP).
:func:`reduce_tokens` is the reference's CLIP entry point: class attention from ``q_cls`` / ``K``,
then the core.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction.attention import class_attention
from vllm_prumerge.reduction.merge import merge_kept_tokens
from vllm_prumerge.reduction.selection import select_tokens

__all__ = ["ReducedTokens", "reduce_by_importance", "reduce_tokens"]


@dataclasses.dataclass(frozen=True)
class ReducedTokens:
    """The reduced visual tokens of a batch of B images, packed (ragged) along the first dim.

    Image ``b`` contributes ``lengths[b]`` consecutive rows of ``features``: its
    ``num_kept[b]`` kept tokens in output order, then the extra token (none in mode ``"off"``).

    Attributes:
        features: ``[T, C]`` in the input features' dtype, ``T = sum(lengths)``.
        lengths: ``[B]`` int64, tokens per image: ``num_kept + 1`` (``N`` in mode ``"off"``;
            0 for a video frame that retained no patch, see
            :func:`~vllm_prumerge.reduction.reduce_frames`).
        kept_indices: ``[sum(num_kept)]`` int64, packed per image: the patch index (``0..N-1``,
            row-major) behind each kept output token, in output order.
        num_kept: ``[B]`` int64, kept patches per image (attention-selected + spatial samples).
        num_outliers: ``[B]`` int64, patches kept for their attention: the IQR outliers after the
            ``min_tokens`` safeguard, or the fixed budget (0 in mode ``"off"``). In reference
            order they are the first ``num_outliers[b]`` tokens.
        importance: ``[B, N]`` float32, the importance scores used: CLS attention
            (:func:`reduce_tokens`) or whatever the caller of :func:`reduce_by_importance` gave
            (for visualisation; NaN in mode ``"off"`` when no scores were given).
        fence: ``[B]`` float32, each image's IQR upper fence (NaN unless the mode is adaptive);
            ``(importance > fence[:, None]).sum(-1)`` is the raw outlier count before the
            safeguard.
        merge_target: ``[B, N]`` int64, for every patch the position within its image's output
            (``0..lengths[b]-1``) of the token that absorbed it most strongly: a kept patch its
            own position; a pruned patch the kept token that picked it as a neighbour with the
            highest key cosine similarity, or the extra token (position ``num_kept[b]``) when
            none picked it. Identity in mode ``"off"``; -1 at a video frame's patches dropped
            by the temporal stage (:func:`~vllm_prumerge.reduction.reduce_frames`).
        host_lengths: ``lengths`` as Python ints (already on the host; no further sync).
        host_num_kept: ``num_kept`` as Python ints.
    """

    features: torch.Tensor
    lengths: torch.Tensor
    kept_indices: torch.Tensor
    num_kept: torch.Tensor
    num_outliers: torch.Tensor
    importance: torch.Tensor
    fence: torch.Tensor
    merge_target: torch.Tensor
    host_lengths: tuple[int, ...]
    host_num_kept: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        """B, the number of images."""
        return len(self.host_lengths)

    @classmethod
    def concat(cls, parts: list[ReducedTokens]) -> ReducedTokens:
        """The results of several batches as one, in order (images of ``parts[0]`` first).

        All parts must have the same ``N`` (patches per image) and feature width."""
        if not parts:
            raise ValueError("ReducedTokens.concat: no parts")
        if len(parts) == 1:
            return parts[0]
        return cls(
            features=torch.cat([p.features for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            kept_indices=torch.cat([p.kept_indices for p in parts]),
            num_kept=torch.cat([p.num_kept for p in parts]),
            num_outliers=torch.cat([p.num_outliers for p in parts]),
            importance=torch.cat([p.importance for p in parts]),
            fence=torch.cat([p.fence for p in parts]),
            merge_target=torch.cat([p.merge_target for p in parts]),
            host_lengths=sum((p.host_lengths for p in parts), ()),
            host_num_kept=sum((p.host_num_kept for p in parts), ()),
        )

    def split(self) -> list[torch.Tensor]:
        """Per-image token tensors ``[L_b, C]`` (views of ``features``), no host sync."""
        return list(self.features.split(list(self.host_lengths)))

    def split_kept_indices(self) -> list[torch.Tensor]:
        """Per-image kept patch indices ``[num_kept[b]]`` (views of ``kept_indices``)."""
        return list(self.kept_indices.split(list(self.host_num_kept)))


def _check_features(features: torch.Tensor) -> None:
    if features.dim() != 3 or features.shape[1] < 1:
        raise ValueError(
            f"reduce_tokens: features must be [B, N, C] with N >= 1, got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise TypeError(f"reduce_tokens: features must be floating point, got {features.dtype}")


def _check_cls_inputs(features: torch.Tensor, q_cls: torch.Tensor, keys: torch.Tensor) -> None:
    batch, n_patches, _ = features.shape
    if q_cls.dim() != 2 or q_cls.shape[0] != batch:
        raise ValueError(
            f"reduce_tokens: q_cls must be [B, D] with B = {batch}, got {tuple(q_cls.shape)}"
        )
    if keys.shape != (batch, n_patches + 1, q_cls.shape[1]):
        raise ValueError(
            f"reduce_tokens: keys must be [B, N + 1, D] = {(batch, n_patches + 1, q_cls.shape[1])}"
            f" (CLS row first), got {tuple(keys.shape)}"
        )
    if not (features.device == q_cls.device == keys.device):
        raise ValueError(
            "reduce_tokens: features, q_cls and keys must be on one device, got "
            f"{features.device}, {q_cls.device}, {keys.device}"
        )


def _check_scores(features: torch.Tensor, importance: torch.Tensor, keys: torch.Tensor) -> None:
    batch, n_patches, _ = features.shape
    if importance.shape != (batch, n_patches):
        raise ValueError(
            f"reduce_by_importance: importance must be [B, N] = {(batch, n_patches)}, "
            f"got {tuple(importance.shape)}"
        )
    if keys.dim() != 3 or keys.shape[:2] != (batch, n_patches):
        raise ValueError(
            f"reduce_by_importance: keys must be [B, N, D] with (B, N) = {(batch, n_patches)}, "
            f"got {tuple(keys.shape)}"
        )
    if not (features.device == importance.device == keys.device):
        raise ValueError(
            "reduce_by_importance: features, importance and keys must be on one device, got "
            f"{features.device}, {importance.device}, {keys.device}"
        )


def _passthrough(features: torch.Tensor, importance: torch.Tensor | None) -> ReducedTokens:
    batch, n_patches, width = features.shape
    device = features.device
    if importance is None:
        importance = torch.full((batch, n_patches), float("nan"), device=device)
    patches = torch.arange(n_patches, device=device)
    counts = torch.full((batch,), n_patches, dtype=torch.int64, device=device)
    return ReducedTokens(
        features=features.reshape(batch * n_patches, width),
        lengths=counts,
        kept_indices=patches.repeat(batch),
        num_kept=counts.clone(),
        num_outliers=torch.zeros_like(counts),
        importance=importance,
        fence=torch.full((batch,), float("nan"), device=device),
        merge_target=patches.expand(batch, n_patches).clone(),
        host_lengths=(n_patches,) * batch,
        host_num_kept=(n_patches,) * batch,
    )


def _pack_index(counts: torch.Tensor, total: int, stride: int, extra_row: bool) -> torch.Tensor:
    """Flat row indices into a padded ``[B, stride]`` layout picking each image's first
    ``counts[b]`` rows (and then row ``stride - 1``, the extra token, when ``extra_row``)."""
    device = counts.device
    lengths = counts + 1 if extra_row else counts
    ends = torch.cumsum(lengths, 0)
    slot = torch.arange(total, device=device)
    image = torch.searchsorted(ends, slot, right=True)
    position = slot - (ends - lengths)[image]
    if extra_row:
        position = torch.where(position == counts[image], stride - 1, position)
    return image * stride + position


def reduce_tokens(
    features: torch.Tensor,
    q_cls: torch.Tensor | None,
    keys: torch.Tensor | None,
    config: PruMergeConfig | None = None,
) -> ReducedTokens:
    """PruMerge / PruMerge+ / fixed-budget reduction by CLS attention, as the reference (CLIP).

    Takes the three tensors of :class:`vllm_prumerge.vision.PruMergeInputs` explicitly
    (``reduce_tokens(*inputs, config)`` works too): the class attention
    ``softmax(q_cls K^T / sqrt(D))`` over CLS + patches (CLS column dropped, see
    :func:`~vllm_prumerge.reduction.class_attention`) is the importance, the patch keys
    ``keys[:, 1:]`` the merge keys, then :func:`reduce_by_importance`.

    Args:
        features: ``[B, N, C]`` patch features (e.g. CLIP ``hidden_states[-2]`` without CLS).
        q_cls: ``[B, D]`` the CLS row of the scoring layer's raw ``q_proj`` output. May be None
            only in mode ``"off"``.
        keys: ``[B, N + 1, D]`` that layer's raw ``k_proj`` output, CLS row first. May be None
            only in mode ``"off"``.
        config: a :class:`PruMergeConfig`; ``None`` means ``PruMergeConfig()`` (PruMerge).

    Returns:
        :class:`ReducedTokens`, as :func:`reduce_by_importance`.
    """
    config = PruMergeConfig() if config is None else config
    _check_features(features)
    if q_cls is None or keys is None:
        if config.enabled:
            raise ValueError(f"reduce_tokens: mode {config.mode!r} needs q_cls and keys")
        return _passthrough(features, None)
    _check_cls_inputs(features, q_cls, keys)
    return reduce_by_importance(features, class_attention(q_cls, keys), keys[:, 1:], config)


def reduce_by_importance(
    features: torch.Tensor,
    importance: torch.Tensor,
    keys: torch.Tensor,
    config: PruMergeConfig | None = None,
) -> ReducedTokens:
    """PruMerge / PruMerge+ / fixed-budget reduction of a batch of images, each on its own.

    Every image (or crop) is reduced independently and bit-identically whatever else is in the
    batch: statistics are never pooled across the batch, and each image runs through the
    selection and merge alone, with shapes that depend only on it. One device-to-host sync per
    image (its kept count, to size the ragged output); deterministic; float32/bfloat16/float16
    inputs (all statistics and the merge in float32, output cast back to the features' dtype);
    CPU or CUDA.

    Steps (see :class:`PruMergeConfig` for every option and edge case):
    1. selection: IQR outliers of the importance per image (or the fixed budget), the
       ``min_tokens`` safeguard, PruMerge+ spatial samples;
    2. merge: each kept token absorbs its ``k_neighbors`` key-nearest patches (cosine similarity
       of ``keys``) weighted by importance; one extra token sums the pruned patches.

    Never raises on odd scores: uniform importance keeps the top ``min_tokens`` patches (ties:
    lower index first), ``r > 1/3`` uses spatial stride 1, non-finite scores are treated as 0.
    Shape errors raise ``ValueError``.

    Args:
        features: ``[B, N, C]`` patch features.
        importance: ``[B, N]`` per-patch importance (CLS attention, received attention, ...);
            used in float32.
        keys: ``[B, N, D]`` the scoring layer's raw patch keys (no CLS row), for the merge.
        config: a :class:`PruMergeConfig`; ``None`` means ``PruMergeConfig()`` (PruMerge).

    Returns:
        :class:`ReducedTokens`; in mode ``"off"`` all ``N`` features per image unchanged, with
        no extra token (``lengths = N``), so callers need only one code path.
    """
    config = PruMergeConfig() if config is None else config
    _check_features(features)
    _check_scores(features, importance, keys)
    importance = torch.nan_to_num(importance.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if not config.enabled:
        return _passthrough(features, importance)
    # One image at a time: the merge's shapes (kept rows, similarity matrix) then depend on that
    # image alone. Batched with padding to the batch's largest kept count, the GEMM behind the
    # cosine similarities rounds differently (~1e-7), which flips near-tied neighbours on flat
    # images: an image's result would depend on its companions and on vLLM's processor cache.
    if features.shape[0] <= 1:
        return _reduce_one(features, importance, keys, config)
    return ReducedTokens.concat(
        [
            _reduce_one(features[i : i + 1], importance[i : i + 1], keys[i : i + 1], config)
            for i in range(features.shape[0])
        ]
    )


def _reduce_one(
    features: torch.Tensor, importance: torch.Tensor, keys: torch.Tensor, config: PruMergeConfig
) -> ReducedTokens:
    """:func:`reduce_by_importance` of one image (``B = 1``): selection, merge, packing."""
    batch, _, width = features.shape
    selection = select_tokens(importance, config)

    host_num_kept = tuple(selection.num_kept.tolist())  # the one host sync: sizes the output
    rows = max(host_num_kept, default=0)
    total_kept = sum(host_num_kept)
    kept_rows = selection.order[:, :rows]
    row_valid = torch.arange(rows, device=features.device) < selection.num_kept.unsqueeze(-1)

    merged = merge_kept_tokens(
        features,
        importance,
        keys,
        kept_rows,
        row_valid,
        selection.kept,
        config.k_neighbors,
        config.merge_weighting,
    )
    padded = torch.cat([merged.tokens, merged.extra.unsqueeze(1)], dim=1)  # [B, M + 1, C]
    flat_tokens = padded.reshape(batch * (rows + 1), width)
    token_index = _pack_index(selection.num_kept, total_kept + batch, rows + 1, extra_row=True)
    kept_index = _pack_index(selection.num_kept, total_kept, rows, extra_row=False)
    return ReducedTokens(
        features=flat_tokens.index_select(0, token_index).to(features.dtype),
        lengths=selection.num_kept + 1,
        kept_indices=kept_rows.reshape(-1).index_select(0, kept_index),
        num_kept=selection.num_kept,
        num_outliers=selection.num_outliers,
        importance=importance,
        fence=selection.fence,
        merge_target=torch.where(
            merged.target == rows, selection.num_kept.unsqueeze(-1), merged.target
        ),
        host_lengths=tuple(n + 1 for n in host_num_kept),
        host_num_kept=host_num_kept,
    )
