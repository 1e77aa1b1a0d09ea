"""Class attention from one layer's raw query/key projections, as the PruMerge reference."""

from __future__ import annotations

import torch

__all__ = ["class_attention"]


def class_attention(q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The CLS token's attention over the patches, single-head over all channels.

    ``a = softmax(q_cls @ keys^T * D**-0.5)`` over all ``N + 1`` keys (CLS included), then the
    CLS column is dropped; ``a`` is *not* renormalised, so each row sums to slightly under 1.
    No per-head split and no head averaging (the reference treats the ``D`` channels as one head).

    Computed in float32 whatever the input dtype (bf16/fp16 inputs are upcast first), so the
    statistics that follow do not suffer half-precision ties. Non-finite results (only possible
    from non-finite or float32-overflowing projections) are replaced by 0, so nothing downstream
    ever sees NaN.

    Args:
        q_cls: ``[B, D]`` the CLS row of the layer's raw ``q_proj`` output (bias included, before
            any scaling or head split).
        keys: ``[B, N + 1, D]`` the layer's raw ``k_proj`` output, CLS row first.

    Returns:
        ``[B, N]`` float32 class attention over the ``N`` patches.
    """
    if q_cls.dim() != 2 or keys.dim() != 3:
        raise ValueError(
            f"class_attention expects q_cls [B, D] and keys [B, N+1, D], "
            f"got {tuple(q_cls.shape)} and {tuple(keys.shape)}"
        )
    if keys.shape[0] != q_cls.shape[0] or keys.shape[2] != q_cls.shape[1]:
        raise ValueError(
            f"class_attention: q_cls {tuple(q_cls.shape)} and keys {tuple(keys.shape)} disagree "
            "on B or D"
        )
    width = q_cls.shape[-1]
    logits = torch.bmm(q_cls.float().unsqueeze(1), keys.float().transpose(1, 2)).squeeze(1)
    attention = torch.softmax(logits * width**-0.5, dim=-1)[:, 1:]
    return torch.nan_to_num(attention, nan=0.0, posinf=0.0, neginf=0.0)
