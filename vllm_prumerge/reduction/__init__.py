"""PruMerge / PruMerge+ token reduction in pure PyTorch (no vLLM, no model code).

Small pure functions, batched and vectorised, composed by :func:`reduce_tokens`:

- :func:`class_attention` / :func:`received_attention` (``attention.py``): importance scores
  from one layer's raw q/k (CLS attention; attention received, for CLS-free towers).
- :func:`select_tokens` (``selection.py``): IQR outliers / fixed budget, safeguard, PruMerge+
  spatial samples, output order.
- :func:`merge_kept_tokens` (``merge.py``): key-similarity merge and the extra token.
- :func:`reduce_by_importance` (``core.py``): selection + merge from any importance scores,
  packed into :class:`ReducedTokens`; :func:`reduce_tokens`: the reference's CLS-attention entry.
- :func:`reduce_frames` (``temporal.py``): a video's frames, with the temporal masks
  (:func:`evs_retention_mask`, :func:`adaptive_retention_mask`) applied before each frame's
  reduction.
"""

from vllm_prumerge.reduction.attention import class_attention, received_attention
from vllm_prumerge.reduction.core import ReducedTokens, reduce_by_importance, reduce_tokens
from vllm_prumerge.reduction.merge import MergeResult, merge_kept_tokens
from vllm_prumerge.reduction.selection import (
    Selection,
    attention_order,
    iqr_upper_fence,
    reference_count,
    select_tokens,
    spatial_sample_mask,
)
from vllm_prumerge.reduction.temporal import (
    adaptive_retention_mask,
    evs_retained_count,
    evs_retention_mask,
    reduce_frames,
    reduce_retained,
    retention_mask,
)

__all__ = [
    "MergeResult",
    "ReducedTokens",
    "Selection",
    "adaptive_retention_mask",
    "attention_order",
    "class_attention",
    "evs_retained_count",
    "evs_retention_mask",
    "iqr_upper_fence",
    "merge_kept_tokens",
    "received_attention",
    "reduce_by_importance",
    "reduce_frames",
    "reduce_retained",
    "reduce_tokens",
    "reference_count",
    "retention_mask",
    "select_tokens",
    "spatial_sample_mask",
]
