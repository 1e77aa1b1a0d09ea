"""PruMerge's "token supplement": kept tokens absorb their key-nearest neighbours.

Vectorised over the batch and the kept tokens: one cosine-similarity matmul, one ``topk``, one
fused gather-and-weighted-sum (``embedding_bag``), no Python loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["MergeResult", "cosine_similarity_rows", "merge_kept_tokens"]


class MergeResult(NamedTuple):
    """Merged tokens of a padded batch of kept sets.

    Attributes:
        tokens: ``[B, M, C]`` float32 merged kept tokens (rows past an image's count are
            padding).
        extra: ``[B, C]`` float32 extra token of each image.
        target: ``[B, N]`` int64, for every patch the row (``0..M``) of the token that absorbs it
            most strongly: a kept patch its own row; a pruned patch the kept token that chose it
            as a neighbour with the highest cosine similarity (ties: the earlier row), or ``M``
            (the extra token) when no kept token chose it.
    """

    tokens: torch.Tensor
    extra: torch.Tensor
    target: torch.Tensor


def cosine_similarity_rows(keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of selected keys against all keys of the same image, in float32.

    Mathematically ``F.normalize(keys)[rows] @ F.normalize(keys).T`` (the reference's form); to
    avoid dividing the whole ``[B, N, D]`` key tensor we normalise only the ``M`` selected rows
    and divide the ``[B, M, N]`` dot products by the other side's norms (same norm clamp,
    ``1e-12``). The results differ from the reference's only by float32 rounding (~1e-7), like
    any reordering of the matmul.

    Args:
        keys: ``[B, N, D]`` keys (any float dtype).
        rows: ``[B, M]`` int64 indices of the selected keys.

    Returns:
        ``[B, M, N]`` float32.
    """
    batch, n_keys, depth = keys.shape
    keys = keys.float()
    norms = torch.linalg.vector_norm(keys, ord=2, dim=-1).clamp_min(1e-12)  # [B, N]
    # index_select on the flattened rows: same values as a gather, several times faster on CPU.
    flat = (rows + torch.arange(batch, device=rows.device).view(batch, 1) * n_keys).reshape(-1)
    selected = keys.reshape(batch * n_keys, depth).index_select(0, flat)
    selected = selected.reshape(batch, rows.shape[1], depth)
    selected = selected / norms.gather(1, rows).unsqueeze(-1)
    dots = torch.bmm(selected, keys.transpose(1, 2))
    return dots / norms.unsqueeze(1)


def _merge_target(
    neighbours: torch.Tensor,
    neighbour_similarity: torch.Tensor,
    kept_rows: torch.Tensor,
    row_valid: torch.Tensor,
    kept: torch.Tensor,
) -> torch.Tensor:
    """See :class:`MergeResult` ``target``; reductions over the ``[B, M * k]`` pairs only."""
    batch, n_patches = kept.shape
    rows, k = neighbours.shape[1], neighbours.shape[2]
    device = kept.device
    own_row = torch.full((batch, n_patches), rows, dtype=torch.int64, device=device)
    own_row.scatter_(1, kept_rows, torch.arange(rows, device=device).expand(batch, rows))
    if rows == 0 or k == 0:
        return torch.where(kept, own_row, rows)
    pairs = neighbours.reshape(batch, rows * k)
    similarity = torch.where(row_valid.unsqueeze(-1), neighbour_similarity, float("-inf"))
    similarity = similarity.reshape(batch, rows * k)
    best = torch.full((batch, n_patches), float("-inf"), device=device)
    best = best.scatter_reduce(1, pairs, similarity, reduce="amax")
    row_of_pair = (torch.arange(rows * k, device=device) // k).expand(batch, rows * k)
    is_best = (similarity == best.gather(1, pairs)) & (similarity > float("-inf"))
    candidate = torch.where(is_best, row_of_pair, rows)
    best_row = torch.full_like(own_row, rows).scatter_reduce(1, pairs, candidate, reduce="amin")
    return torch.where(kept, own_row, best_row)


def merge_kept_tokens(
    features: torch.Tensor,
    attention: torch.Tensor,
    keys: torch.Tensor,
    kept_rows: torch.Tensor,
    row_valid: torch.Tensor,
    kept: torch.Tensor,
    k_neighbors: int,
    weighting: str = "reference",
) -> MergeResult:
    """Merge each kept token with its ``k_neighbors`` most key-similar patches; add the extra token.

    For a kept patch ``i`` the candidates are all other patches (other kept patches with their
    original, unmerged features, and all pruned patches); the ``k`` with the highest cosine
    similarity of their keys are its neighbours ``J_i`` (ties at the k-th place are broken by
    ``torch.topk``). With ``a`` the importance (e.g. class attention):

    - ``weighting="reference"``: ``y_i = x_i + sum_{j in J_i} a_j x_j`` (centre weight 1, raw
      attention, unnormalised) and ``extra = sum_{j pruned} a_j x_j``, exactly as the reference.
    - ``weighting="normalized"``: ``y_i = (x_i + sum a_j x_j) / (1 + sum a_j)`` and
      ``extra = sum a_j x_j / sum a_j`` (0 when nothing is pruned or that sum is 0).

    ``k`` is clipped to ``N - 1``. Arithmetic is float32 whatever the input dtype.

    Args:
        features: ``[B, N, C]`` patch features (any float dtype).
        attention: ``[B, N]`` float32 importance (class or received attention).
        keys: ``[B, N, D]`` patch keys (CLS row removed), any float dtype.
        kept_rows: ``[B, M]`` int64 patch index of each output row (padding rows hold distinct
            pruned patch indices: they are computed and then ignored).
        row_valid: ``[B, M]`` bool, False on padding rows.
        kept: ``[B, N]`` bool, the kept patches (exactly the valid rows' indices).
        k_neighbors: neighbours per kept token (32 in the reference).
        weighting: ``"reference"`` or ``"normalized"``.

    Returns:
        A :class:`MergeResult`.
    """
    batch, n_patches, width = features.shape
    rows = kept_rows.shape[1]
    k = min(k_neighbors, n_patches - 1)
    device = features.device
    values = features.float().contiguous()

    offsets = (torch.arange(batch, device=device) * n_patches).view(batch, 1)
    flat_rows = (kept_rows + offsets).reshape(-1)
    similarity = cosine_similarity_rows(keys, kept_rows)
    similarity.scatter_(2, kept_rows.unsqueeze(-1), float("-inf"))
    neighbour_similarity, neighbours = similarity.topk(k, dim=-1)

    centres = values.reshape(batch * n_patches, width).index_select(0, flat_rows)
    centres = centres.reshape(batch, rows, width)
    weights = attention.gather(1, neighbours.reshape(batch, rows * k)).reshape(batch * rows, k)
    if rows > 0 and k > 0:
        absorbed = F.embedding_bag(
            (neighbours + offsets.unsqueeze(-1)).reshape(batch * rows, k),
            values.reshape(batch * n_patches, width),
            per_sample_weights=weights,
            mode="sum",
        ).reshape(batch, rows, width)
        tokens = absorbed + centres
    else:
        tokens = centres.clone()
    pruned_attention = torch.where(kept, 0.0, attention)
    extra = torch.bmm(pruned_attention.unsqueeze(1), values).squeeze(1)
    if weighting == "normalized":
        tokens = tokens / (1.0 + weights.sum(-1)).reshape(batch, rows, 1)
        total = pruned_attention.sum(-1, keepdim=True)
        extra = extra / torch.where(total > 0, total, 1.0)

    target = _merge_target(neighbours, neighbour_similarity, kept_rows, row_valid, kept)
    return MergeResult(tokens=tokens, extra=extra, target=target)
