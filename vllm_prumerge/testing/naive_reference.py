"""A deliberately naive transcription of the PruMerge / PruMerge+ reference, one image at a time.

Written step by step from the shared docs' prumerge-reference.md (the authors' clip_encoder.py
semantics): a Python loop per kept token, NumPy quartiles on the host, batch size 1. It does not
import the production code; the tests and the benchmark compare against it.

Quirks kept on purpose, as the reference: the outlier count goes through ``int(N * (n / N))``;
PruMerge+ divides by zero when nothing is an outlier and fails on a zero stride (``r > 1/3``).
The one thing the reference leaves unspecified, the order of equal attention values, is pinned
here to "lower patch index first".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def naive_class_attention(
    q_cls: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``softmax(q_cls @ K^T * C**-0.5)`` over all N + 1 keys, CLS column dropped.

    q_cls ``[C]``, keys ``[N + 1, C]``; computed in ``dtype`` (None: the inputs' own dtype, as the
    reference does in the tower's precision). Returns ``[N]``.
    """
    if dtype is not None:
        q_cls, keys = q_cls.to(dtype), keys.to(dtype)
    width = q_cls.shape[-1]
    attn = (q_cls.unsqueeze(0) @ keys.transpose(0, 1)) * width**-0.5
    attn = F.softmax(attn, dim=-1)
    return attn[0, 1:]


def naive_upper_fence(attn: torch.Tensor, multiplier: float = 1.5) -> float:
    """NumPy quartiles of the float32 attention, then Q3 + multiplier * IQR (upper fence only)."""
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1 = np.percentile(attn_np, 25)
    q3 = np.percentile(attn_np, 75)
    iqr = q3 - q1
    return q3 + multiplier * iqr


def naive_outlier_ratio(attn: torch.Tensor, multiplier: float = 1.5) -> float:
    """The reference's ``outlier_dectection``: the fraction of values strictly above the fence."""
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    upper_bound = naive_upper_fence(attn, multiplier)
    outlier_indices = np.where(attn_np > upper_bound)[0]
    return len(outlier_indices) / len(attn_np)


def naive_descending(attn: torch.Tensor) -> list[int]:
    """All patch indices by descending attention; equal values: lower index first."""
    values = attn.to(torch.float32).tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def naive_plus_samples(kept: list[int], ratio: float, n_patches: int) -> list[int]:
    """PruMerge+'s adaptive branch: ``range(0, N - 1, int(int(1 / r) / 3))`` minus kept ones.

    Raises ZeroDivisionError for r = 0 and ValueError for a zero stride, as the reference fails.
    """
    step_length = int(1 / ratio)
    stride = int(step_length / 3)
    arithmetic_sequence = range(0, n_patches - 1, stride)
    return [x for x in arithmetic_sequence if x not in kept]


def naive_merge(
    features: torch.Tensor,
    attn: torch.Tensor,
    keys_wo_cls: torch.Tensor,
    kept: list[int],
    k: int = 32,
    weighting: str = "reference",
) -> torch.Tensor:
    """The token supplement, one kept token at a time, as the reference loop.

    features ``[N, C]``, attn ``[N]``, keys_wo_cls ``[N, C]``, kept: patch indices in output
    order. For kept token i the candidates are [kept before i, kept after i, pruned ascending];
    the k most cosine-similar are merged with their raw attention as weights, centre weight 1.
    ``weighting="normalized"`` divides by the sum of the weights (ours, not the reference).
    Returns ``[len(kept) + 1, C]``: merged kept tokens, then the extra token.
    """
    n_patches = features.shape[0]
    kept_set = set(kept)
    pruned = [j for j in range(n_patches) if j not in kept_set]
    kept_index = torch.tensor(kept, dtype=torch.long)
    pruned_index = torch.tensor(pruned, dtype=torch.long)
    keys_norm = F.normalize(keys_wo_cls, p=2, dim=-1)
    x_others, non_topk = features[kept_index], features[pruned_index]
    key_others, non_topk_key = keys_norm[kept_index], keys_norm[pruned_index]
    attn_others, non_topk_attn = attn[kept_index], attn[pruned_index]
    rows = []
    for i in range(len(kept)):
        rest_x = torch.cat([x_others[:i], x_others[i + 1 :], non_topk])
        rest_keys = torch.cat([key_others[:i], key_others[i + 1 :], non_topk_key])
        rest_attn = torch.cat([attn_others[:i], attn_others[i + 1 :], non_topk_attn])
        cos_sim = rest_keys @ key_others[i]
        cluster = torch.topk(cos_sim, k=min(k, len(rest_keys)), largest=True).indices
        weights = rest_attn[cluster].unsqueeze(-1)
        weighted = torch.sum(rest_x[cluster] * weights, dim=0)
        merged = x_others[i] + weighted
        if weighting == "normalized":
            merged = merged / (1 + weights.sum())
        rows.append(merged)
    pruned_attn = non_topk_attn.unsqueeze(-1)
    extra = torch.sum(non_topk * pruned_attn, dim=0)
    if weighting == "normalized" and len(pruned) and float(pruned_attn.sum()) > 0:
        extra = extra / pruned_attn.sum()
    rows.append(extra)
    return torch.stack(rows)


def naive_prumerge(
    features: torch.Tensor,
    q_cls: torch.Tensor,
    keys: torch.Tensor,
    plus: bool = False,
    multiplier: float = 1.5,
    k: int = 32,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """The whole reference pipeline for one image.

    features ``[N, C]``, q_cls ``[C]``, keys ``[N + 1, C]``; ``dtype`` as in
    :func:`naive_class_attention` (features are computed in it too). Returns the tokens
    ``[n + 1, C]`` (``n + |samples| + 1`` for PruMerge+), the kept indices in output order and the
    attention ``[N]``.
    """
    if dtype is not None:
        features, q_cls, keys = features.to(dtype), q_cls.to(dtype), keys.to(dtype)
    n_patches = features.shape[0]
    attn = naive_class_attention(q_cls, keys)
    ratio = naive_outlier_ratio(attn, multiplier)
    kept = naive_descending(attn)[: int(n_patches * ratio)]
    if plus:
        kept = kept + naive_plus_samples(kept, ratio, n_patches)
    tokens = naive_merge(features, attn, keys[1:], kept, k)
    return tokens, kept, attn


# Synthetic inputs, shared by the tests and the benchmark (generated, never downloaded).

INPUT_KINDS = ("random", "clip", "peaked", "nearly_uniform", "uniform", "ties")


def synthetic_inputs(
    batch: int,
    n_patches: int,
    width: int,
    kind: str = "clip",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(features [B, N, C], q_cls [B, C], keys [B, N + 1, C])`` with a chosen attention.

    ``"random"``: Gaussian everything. Other kinds steer the class logits through channel 0 only
    (``q_cls = c * e_0``, so logit_j = c * keys[j, 0] / sqrt(C) exactly up to rounding, equal
    targets giving bit-equal logits) while the other channels stay Gaussian (no cosine ties):
    ``"clip"``: Gaussian logits plus about 2% spikes (about 32 outliers of 576, like CLIP-L/14-336);
    ``"peaked"``: a handful of huge logits; ``"nearly_uniform"``: logits within 1e-3;
    ``"uniform"``: q_cls = 0, so attention is exactly uniform (no outlier at all);
    ``"ties"``: logits from four levels, so many attention values are exactly equal.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n_patches, width, generator=gen)
    keys = torch.randn(batch, n_patches + 1, width, generator=gen)
    q_cls = torch.randn(batch, width, generator=gen)
    if kind != "random":
        shape = (batch, n_patches + 1)
        if kind == "clip":
            logits = 0.5 * torch.randn(shape, generator=gen)
            spikes = torch.rand(shape, generator=gen) < 0.02
            logits = logits + spikes * (3.0 + 3.0 * torch.rand(shape, generator=gen))
        elif kind == "peaked":
            logits = 0.1 * torch.randn(shape, generator=gen)
            peaks = min(5, n_patches)
            logits[:, 1 : 1 + peaks] += 20.0 + torch.rand(batch, peaks, generator=gen)
            logits = logits[:, torch.randperm(n_patches + 1, generator=gen)]
        elif kind == "nearly_uniform":
            logits = 1e-3 * torch.rand(shape, generator=gen)
        elif kind == "ties":
            levels = torch.tensor([0.0, 0.5, 1.0, 4.0])
            weights = torch.tensor([0.4, 0.3, 0.24, 0.06])
            draws = torch.multinomial(weights, batch * (n_patches + 1), True, generator=gen)
            logits = levels[draws].view(shape)
        else:
            logits = torch.zeros(shape)
        scale = 4.0
        q_cls = torch.zeros(batch, width)
        q_cls[:, 0] = 0.0 if kind == "uniform" else scale
        keys[:, :, 0] = logits * width**0.5 / scale
    return features.to(dtype), q_cls.to(dtype), keys.to(dtype)
