"""Reduction across time: which patches of a video's frames the per-frame reduction sees.

Pure PyTorch on the tower's patch features ``[T, N, C]`` (frames in time order, ``N`` patches
of each in row-major order); no vLLM, no model code. Two criteria (``PruMergeConfig.temporal``):

- ``"evs"``: vLLM's Efficient Video Sampling (``compute_retention_mask`` in
  ``vllm/multimodal/video_prune/evs.py``, with spatial merge 1), reimplemented here operation for
  operation so that the mask is the same bit for bit: dissimilarity ``1 - cosine`` of every patch
  to the same patch of the previous frame, the first frame set to 255 (always kept), one stable
  descending sort over the whole video, the top ``max(N, int(T * N * (1 - rate)))`` kept.
- ``"adaptive"``: a patch of frame ``t >= 2`` is dropped when its cosine similarity to the same
  patch of its anchor (the last frame in which that position was kept) is at least the
  threshold; the first frame is whole. The count follows the content: a static video costs about
  one frame, a scene cut keeps the frame after the cut whole.

Then :func:`reduce_frames` runs each frame's mode on its retained patches only (importance, IQR
fence, PruMerge+ samples and merge among them, the extra token when it retained any); a frame
that retained none contributes no token. Cosines are computed in float32.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction.core import ReducedTokens, reduce_by_importance

__all__ = [
    "adaptive_retention_mask",
    "evs_retained_count",
    "evs_retention_mask",
    "reduce_frames",
    "reduce_retained",
    "retention_mask",
]


def _check_frames(features: torch.Tensor) -> None:
    if features.dim() != 3 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(
            f"temporal reduction: features must be [T, N, C] with T, N >= 1, "
            f"got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise TypeError(
            f"temporal reduction: features must be floating point, got {features.dtype}"
        )


def evs_retained_count(tokens_per_frame: int, num_frames: int, rate: float) -> int:
    """Patches EVS keeps of a video: ``max(N, int(T * N * (1 - rate)))`` (vLLM's
    ``compute_retained_tokens_count``): never fewer than one frame's."""
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - rate)))


def evs_retention_mask(features: torch.Tensor, rate: float) -> torch.Tensor:
    """vLLM's EVS mask with spatial merge 1 on ``[T, N, C]`` patch features (float32).

    Args:
        features: ``[T, N, C]`` the frames' patch features.
        rate: the pruning rate ``q`` in ``[0, 1)``.

    Returns:
        ``[T, N]`` bool, True for the retained patches; frame 0 always whole.
    """
    _check_frames(features)
    if not 0 <= rate < 1:
        raise ValueError(f"evs_retention_mask: rate must be in [0, 1), got {rate!r}")
    frames, patches, _ = features.shape
    features = features.float()
    similarity = F.cosine_similarity(features[1:], features[:-1], dim=-1)
    dissimilarity = 1 - similarity
    first = 255 * torch.ones_like(features[:1, :, 0])
    dissimilarity = torch.cat([first, dissimilarity], dim=0).view(-1)
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    retained = torch.zeros_like(dissimilarity, dtype=torch.bool)
    retained.index_fill_(0, order[: evs_retained_count(patches, frames, rate)], True)
    return retained.view(frames, patches)


def adaptive_retention_mask(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """The ``adaptive`` mask on ``[T, N, C]`` patch features (cosines in float32).

    Frame 0 is whole and is every position's first anchor; a patch of a later frame is dropped
    when its cosine similarity to its position's anchor is ``>= threshold``, else kept and made
    that position's anchor.

    Returns:
        ``[T, N]`` bool, True for the retained patches.
    """
    _check_frames(features)
    features = features.float()
    retained = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    anchor = features[0]
    for t in range(1, features.shape[0]):
        similarity = F.cosine_similarity(features[t], anchor, dim=-1)
        kept = similarity < threshold
        retained[t] = kept
        anchor = torch.where(kept.unsqueeze(-1), features[t], anchor)
    return retained


def retention_mask(features: torch.Tensor, config: PruMergeConfig) -> torch.Tensor:
    """``[T, N]`` bool: the patches ``config.temporal`` retains (``"off"``: all of them)."""
    _check_frames(features)
    if config.temporal == "evs":
        return evs_retention_mask(features, config.temporal_rate)
    if config.temporal == "adaptive":
        return adaptive_retention_mask(features, config.temporal_threshold)
    return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)


def _empty(features: torch.Tensor, importance: torch.Tensor) -> ReducedTokens:
    """The result of a frame that retained no patch: no token at all."""
    device = features.device
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    return ReducedTokens(
        features=features.new_zeros((0, features.shape[-1])),
        lengths=zero,
        kept_indices=torch.zeros(0, dtype=torch.int64, device=device),
        num_kept=zero.clone(),
        num_outliers=zero.clone(),
        importance=importance,
        fence=torch.full((1,), float("nan"), device=device),
        merge_target=torch.full(importance.shape, -1, dtype=torch.int64, device=device),
        host_lengths=(0,),
        host_num_kept=(0,),
    )


def reduce_retained(
    features: torch.Tensor,
    importance: torch.Tensor,
    keys: torch.Tensor,
    retained: torch.Tensor,
    config: PruMergeConfig,
) -> ReducedTokens:
    """One frame (``B = 1``) reduced on its retained patches only.

    The frame's mode runs on the retained patches as if they were the whole frame (their
    importance, IQR fence, PruMerge+ samples over them, merge among them, the extra token of
    the pruned ones among them); a frame with every patch retained gives exactly
    :func:`reduce_by_importance` of the frame, one with none an empty result (length 0).

    Args:
        features: ``[1, N, C]``; importance: ``[1, N]`` (the tower's, on the whole frame);
            keys: ``[1, N, D]``; retained: ``[N]`` bool.
        config: a :class:`PruMergeConfig` whose mode is not ``"off"``.

    Returns:
        :class:`ReducedTokens` of one frame: ``kept_indices`` are patch indices of the whole
        frame, ``importance`` the whole frame's, ``merge_target`` -1 at dropped patches.
    """
    if features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(
            f"reduce_retained: features must be [1, N, C], got {tuple(features.shape)}"
        )
    if retained.shape != features.shape[1:2]:
        raise ValueError(
            f"reduce_retained: retained must be [N] = [{features.shape[1]}], "
            f"got {list(retained.shape)}"
        )
    index = retained.nonzero().squeeze(-1)
    if index.numel() == features.shape[1]:
        return reduce_by_importance(features, importance, keys, config)
    full_importance = torch.nan_to_num(importance.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if index.numel() == 0:
        return _empty(features, full_importance)
    sub = reduce_by_importance(features[:, index], importance[:, index], keys[:, index], config)
    target = torch.full(importance.shape, -1, dtype=torch.int64, device=features.device)
    target[:, index] = sub.merge_target
    return dataclasses.replace(
        sub,
        kept_indices=index[sub.kept_indices],
        importance=full_importance,
        merge_target=target,
    )


def reduce_frames(
    features: torch.Tensor,
    importance: torch.Tensor,
    keys: torch.Tensor,
    config: PruMergeConfig | None = None,
) -> ReducedTokens:
    """A video's frames: the temporal mask of ``config.temporal``, then each frame reduced on
    its retained patches (:func:`reduce_retained`), frames in time order.

    With ``temporal="off"`` (or mode ``"off"``) this is :func:`reduce_by_importance` of the
    frames, each on its own.

    Args:
        features: ``[T, N, C]`` the frames' patch features (what the temporal criterion
            compares, and what is reduced).
        importance: ``[T, N]`` per-patch importance of each frame (on its whole frame).
        keys: ``[T, N, D]`` the scoring layer's patch keys, for the merge.
        config: a :class:`PruMergeConfig`; None: ``PruMergeConfig()``.

    Returns:
        :class:`ReducedTokens` with one row per frame (``lengths`` 0 for a frame that retained
        no patch; ``merge_target`` -1 at every dropped patch).
    """
    config = PruMergeConfig() if config is None else config
    if not config.enabled or config.temporal == "off":
        return reduce_by_importance(features, importance, keys, config)
    _check_frames(features)
    if importance.shape != features.shape[:2] or keys.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"reduce_frames: importance must be [T, N] and keys [T, N, D] with (T, N) = "
            f"{tuple(features.shape[:2])}, got {tuple(importance.shape)}, {tuple(keys.shape)}"
        )
    retained = retention_mask(features, config)
    return ReducedTokens.concat(
        [
            reduce_retained(
                features[t : t + 1], importance[t : t + 1], keys[t : t + 1], retained[t], config
            )
            for t in range(features.shape[0])
        ]
    )
