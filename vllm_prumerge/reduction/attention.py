"""Importance scores from one layer's raw query/key projections: CLS attention (the PruMerge
reference) and received attention (CLS-free towers such as SigLIP)."""

from __future__ import annotations

import torch

__all__ = ["class_attention", "received_attention"]


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


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, *, chunk: int = 1024
) -> torch.Tensor:
    """The attention each token receives: mean over heads and over all queries, per key.

    ``s_j = mean_h mean_i softmax_j(q_i^h . k_j^h / sqrt(d_h))`` with the ``D`` channels split
    into ``num_heads`` heads of ``d_h = D / num_heads`` channels, as the tower's own attention
    splits them. The importance of CLS-free towers (SigLIP); rows sum to 1 over the ``T`` keys.
    Computed in float32, chunked over queries so the memory is ``O(H * chunk * T)``.
    Non-finite results are replaced by 0.

    Args:
        queries: ``[B, T, D]`` the layer's raw ``q_proj`` output for all ``T`` tokens.
        keys: ``[B, T, D]`` the layer's raw ``k_proj`` output for the same tokens.
        num_heads: ``H``; must divide ``D``.
        chunk: queries per softmax block (memory bound only; the result does not depend on it).

    Returns:
        ``[B, T]`` float32: the attention each of the ``T`` tokens receives. Callers drop the
        columns of non-patch tokens (e.g. CLS) themselves, without renormalising.
    """
    if queries.dim() != 3 or queries.shape != keys.shape:
        raise ValueError(
            "received_attention expects queries and keys of one shape [B, T, D], "
            f"got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    batch, tokens, width = queries.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"received_attention: {num_heads} heads do not divide D = {width}")
    head_dim = width // num_heads
    q = queries.float().view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    k = keys.float().view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    total = torch.zeros(batch, num_heads, tokens, dtype=torch.float32, device=queries.device)
    for start in range(0, tokens, chunk):
        logits = q[:, :, start : start + chunk] @ k.transpose(-1, -2) * head_dim**-0.5
        total += torch.softmax(logits, dim=-1).sum(dim=2)
    scores = total.mean(dim=1) / tokens
    return torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
