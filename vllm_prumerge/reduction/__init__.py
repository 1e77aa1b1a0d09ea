"""PruMerge / PruMerge+ token reduction in pure PyTorch (no vLLM, no model code).

Small pure functions, batched and vectorised, composed by :func:`reduce_tokens`:

- :func:`class_attention` / :func:`received_attention` (``attention.py``): importance scores
  from one layer's raw q/k (CLS attention; attention received, for CLS-free towers).
- :func:`select_tokens` (``selection.py``): IQR outliers / fixed budget, safeguard, PruMerge+
  spatial samples, output order.
- :func:`merge_kept_tokens` (``merge.py``): key-similarity merge and the extra token.
- :func:`reduce_by_importance` (``core.py``): selection + merge from any importance scores,
  packed into :class:`ReducedTokens`; :func:`reduce_tokens`: the reference's CLS-attention entry.
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

__all__ = [
    "MergeResult",
    "ReducedTokens",
    "Selection",
    "attention_order",
    "class_attention",
    "iqr_upper_fence",
    "merge_kept_tokens",
    "received_attention",
    "reduce_by_importance",
    "reduce_tokens",
    "reference_count",
    "select_tokens",
    "spatial_sample_mask",
]
