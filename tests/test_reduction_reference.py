"""The batched reduction equals the naive per-token transcription of the reference.

Where the reference crashes (PruMerge+ with no outlier, a zero stride), our documented safeguard
behaviour is pinned instead, with the merge still checked against the naive loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import (
    iqr_upper_fence,
    reduce_tokens,
    reference_count,
    spatial_sample_mask,
)
from vllm_prumerge.testing.naive_reference import (
    naive_class_attention,
    naive_descending,
    naive_merge,
    naive_plus_samples,
    naive_prumerge,
    naive_upper_fence,
    synthetic_inputs,
)

FP32_TOL = {"atol": 2e-5, "rtol": 1e-5}
REFERENCE_KINDS = ("random", "clip", "peaked", "ties")


def _config(plus: bool, **overrides) -> PruMergeConfig:
    return PruMergeConfig(mode="prumerge+" if plus else "prumerge", **overrides)


def _reference_crashes(attn: torch.Tensor, n_patches: int) -> bool:
    """PruMerge+ in the reference divides by zero (no outlier) or fails on a zero stride."""
    fence = naive_upper_fence(attn)
    count = int((attn.float().numpy() > fence).sum())
    return count == 0 or int(int(1 / (count / n_patches)) / 3) == 0


def _assert_image_matches_naive(out, b, features, q_cls, keys, plus, **naive_kwargs):
    tokens, kept, _ = naive_prumerge(features[b], q_cls[b], keys[b], plus=plus, **naive_kwargs)
    assert out.split_kept_indices()[b].tolist() == kept
    torch.testing.assert_close(out.split()[b], tokens, **FP32_TOL)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
@pytest.mark.parametrize("kind", REFERENCE_KINDS)
@pytest.mark.parametrize(("n_patches", "width"), [(576, 64), (196, 32), (577, 16), (100, 8)])
def test_float32_output_equals_the_naive_reference_on_many_seeds(plus, kind, n_patches, width):
    for seed in range(3):
        features, q_cls, keys = synthetic_inputs(2, n_patches, width, kind, seed=seed)
        out = reduce_tokens(features, q_cls, keys, _config(plus, min_tokens=0))
        for b in range(2):
            attn = naive_class_attention(q_cls[b], keys[b])
            if plus and _reference_crashes(attn, n_patches):
                continue
            _assert_image_matches_naive(out, b, features, q_cls, keys, plus)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_float32_output_equals_the_naive_reference_at_2304_patches(plus):
    features, q_cls, keys = synthetic_inputs(1, 2304, 16, "clip", seed=7)
    out = reduce_tokens(features, q_cls, keys, _config(plus))
    _assert_image_matches_naive(out, 0, features, q_cls, keys, plus)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_a_batch_with_different_counts_gives_each_image_its_own_reference_result(plus):
    parts = [synthetic_inputs(1, 576, 32, kind, seed=s) for s, kind in enumerate(REFERENCE_KINDS)]
    parts += [synthetic_inputs(1, 576, 32, "clip", seed=s) for s in (11, 12)]
    features, q_cls, keys = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
    out = reduce_tokens(features, q_cls, keys, _config(plus))
    assert len(set(out.host_num_kept)) > 2, "the batch should mix different counts"
    for b in range(features.shape[0]):
        _assert_image_matches_naive(out, b, features, q_cls, keys, plus)
    assert out.features.shape[0] == sum(out.host_lengths)
    assert torch.equal(out.lengths, out.num_kept + 1)


def test_prumerge_with_min_tokens_zero_reproduces_the_reference_single_extra_token():
    features, q_cls, keys = synthetic_inputs(2, 576, 32, "uniform", seed=3)
    out = reduce_tokens(features, q_cls, keys, _config(False, min_tokens=0))
    assert out.host_lengths == (1, 1)
    for b in range(2):
        tokens, kept, _ = naive_prumerge(features[b], q_cls[b], keys[b])
        assert kept == []
        torch.testing.assert_close(out.split()[b], tokens, **FP32_TOL)


@pytest.mark.parametrize("kind", ["uniform", "nearly_uniform"])
@pytest.mark.parametrize("min_tokens", [1, 4])
@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_no_outlier_keeps_the_top_min_tokens_patches_instead(kind, min_tokens, plus):
    features, q_cls, keys = synthetic_inputs(2, 576, 32, kind, seed=5)
    out = reduce_tokens(features, q_cls, keys, _config(plus, min_tokens=min_tokens))
    for b in range(2):
        attn = naive_class_attention(q_cls[b], keys[b])
        assert (attn.numpy() > naive_upper_fence(attn)).sum() == 0
        kept = naive_descending(attn)[:min_tokens]
        if kind == "uniform":
            assert kept == list(range(min_tokens)), "ties go to the lower patch index"
        if plus:
            kept += naive_plus_samples(kept, min_tokens / 576, 576)
        assert out.split_kept_indices()[b].tolist() == kept
        assert int(out.num_outliers[b]) == min_tokens
        expected = naive_merge(features[b], attn, keys[b, 1:], kept)
        torch.testing.assert_close(out.split()[b], expected, **FP32_TOL)


def test_uniform_attention_prumerge_plus_gives_the_documented_four_tokens():
    features, q_cls, keys = synthetic_inputs(1, 576, 32, "uniform", seed=0)
    out = reduce_tokens(features, q_cls, keys, _config(True))
    # n = 1 (safeguard) -> r = 1/576 -> step 576 -> stride 192 -> samples 0, 192, 384.
    assert out.kept_indices.tolist() == [0, 192, 384]
    assert out.host_lengths == (4,)


def test_prumerge_plus_with_min_tokens_zero_and_no_outlier_samples_only_patch_zero():
    features, q_cls, keys = synthetic_inputs(1, 576, 32, "uniform", seed=0)
    out = reduce_tokens(features, q_cls, keys, _config(True, min_tokens=0))
    assert out.kept_indices.tolist() == [0]
    assert int(out.num_outliers[0]) == 0
    attn = naive_class_attention(q_cls[0], keys[0])
    torch.testing.assert_close(out.features, naive_merge(features[0], attn, keys[0, 1:], [0]))


@pytest.mark.parametrize("min_tokens", [200, 400, 576])
def test_a_kept_ratio_above_one_third_samples_with_stride_one(min_tokens):
    features, q_cls, keys = synthetic_inputs(1, 576, 16, "uniform", seed=0)
    out = reduce_tokens(features, q_cls, keys, _config(True, min_tokens=min_tokens))
    expected = list(range(min_tokens)) + list(range(min_tokens, 575))
    assert out.kept_indices.tolist() == expected
    attn = naive_class_attention(q_cls[0], keys[0])
    torch.testing.assert_close(
        out.features, naive_merge(features[0], attn, keys[0, 1:], expected), **FP32_TOL
    )


@pytest.mark.parametrize("n_patches", [576, 2304])
def test_spatial_samples_follow_the_reference_formula_for_every_count(n_patches):
    counts = torch.arange(1, n_patches + 1)
    mask = spatial_sample_mask(counts, n_patches)
    for n in range(1, n_patches + 1):
        ratio = n / n_patches
        stride = int(int(1 / ratio) / 3) or 1  # 0 (the reference's crash) -> documented 1
        expected = list(range(0, n_patches - 1, stride))
        assert mask[n - 1].nonzero().flatten().tolist() == expected, n


@pytest.mark.parametrize("n_patches", [576, 577, 100, 2304, 49])
def test_the_outlier_count_round_trips_through_a_float_ratio_as_in_python(n_patches):
    counts = torch.arange(0, n_patches + 1)
    expected = [int(n_patches * (n / n_patches)) for n in range(n_patches + 1)]
    assert reference_count(counts, n_patches).tolist() == expected


@pytest.mark.parametrize("n_patches", [4, 5, 6, 7, 100, 576, 577, 2304])
def test_the_iqr_fence_is_bit_identical_to_numpy_percentile(n_patches):
    gen = torch.Generator().manual_seed(n_patches)
    rows = [
        torch.rand(8, n_patches, generator=gen),
        torch.rand(8, n_patches, generator=gen) ** 6 / 1000,
        torch.randint(0, 4, (8, n_patches), generator=gen).float() / 577,
    ]
    attention = torch.cat(rows)
    fence = iqr_upper_fence(attention.sort(-1).values, 1.5)
    for b in range(attention.shape[0]):
        values = attention[b].numpy()
        q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
        assert fence[b].item() == np.float32(q3 + 1.5 * (q3 - q1))


@pytest.mark.parametrize("multiplier", [0.0, 0.5, 3.0])
def test_the_iqr_multiplier_moves_the_fence_as_the_reference_would(multiplier):
    features, q_cls, keys = synthetic_inputs(2, 576, 32, "clip", seed=9)
    out = reduce_tokens(features, q_cls, keys, PruMergeConfig(iqr_multiplier=multiplier))
    for b in range(2):
        _assert_image_matches_naive(out, b, features, q_cls, keys, False, multiplier=multiplier)


@pytest.mark.parametrize("k", [1, 5, 100])
def test_the_number_of_neighbours_is_configurable(k):
    features, q_cls, keys = synthetic_inputs(2, 196, 32, "clip", seed=4)
    out = reduce_tokens(features, q_cls, keys, PruMergeConfig(k_neighbors=k))
    for b in range(2):
        _assert_image_matches_naive(out, b, features, q_cls, keys, False, k=k)


@pytest.mark.parametrize("n_patches", [1, 2, 3, 9])
def test_tiny_images_clip_k_to_the_available_candidates(n_patches):
    features, q_cls, keys = synthetic_inputs(2, n_patches, 8, "random", seed=n_patches)
    for plus in (False, True):
        out = reduce_tokens(features, q_cls, keys, _config(plus, min_tokens=n_patches))
        assert out.host_num_kept == (n_patches,) * 2
        for b in range(2):
            kept = out.split_kept_indices()[b].tolist()
            attn = naive_class_attention(q_cls[b], keys[b])
            expected = naive_merge(features[b], attn, keys[b, 1:], kept, k=32)
            torch.testing.assert_close(out.split()[b], expected, **FP32_TOL)
            assert torch.all(out.split()[b][-1] == 0), "nothing pruned: the extra token is 0"


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("budget", [{"budget": 64}, {"budget_ratio": 0.125}, {"budget": 300}])
def test_fixed_budget_keeps_the_top_patches_by_attention(spatial, budget):
    features, q_cls, keys = synthetic_inputs(2, 576, 32, "clip", seed=2)
    config = PruMergeConfig(mode="fixed", spatial_samples=spatial, **budget)
    out = reduce_tokens(features, q_cls, keys, config)
    count = budget.get("budget") or int(576 * budget["budget_ratio"])
    for b in range(2):
        attn = naive_class_attention(q_cls[b], keys[b])
        kept = naive_descending(attn)[:count]
        if spatial:
            stride = int(int(1 / (count / 576)) / 3) or 1
            kept += [x for x in range(0, 575, stride) if x not in kept]
        assert out.split_kept_indices()[b].tolist() == kept
        assert torch.isnan(out.fence[b])
        expected = naive_merge(features[b], attn, keys[b, 1:], kept)
        torch.testing.assert_close(out.split()[b], expected, **FP32_TOL)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_normalized_weighting_is_the_attention_weighted_average(plus):
    features, q_cls, keys = synthetic_inputs(2, 576, 32, "clip", seed=6)
    out = reduce_tokens(features, q_cls, keys, _config(plus, merge_weighting="normalized"))
    for b in range(2):
        attn = naive_class_attention(q_cls[b], keys[b])
        kept = out.split_kept_indices()[b].tolist()
        expected = naive_merge(features[b], attn, keys[b, 1:], kept, weighting="normalized")
        torch.testing.assert_close(out.split()[b], expected, **FP32_TOL)


def test_off_mode_passes_every_patch_feature_through_unchanged():
    features, q_cls, keys = synthetic_inputs(3, 576, 32, "clip", seed=1)
    for args in ((q_cls, keys), (None, None)):
        out = reduce_tokens(features, *args, PruMergeConfig(mode="off"))
        assert out.host_lengths == (576,) * 3
        assert torch.equal(out.features, features.reshape(-1, 32))
        assert out.kept_indices.tolist() == list(range(576)) * 3
        assert torch.equal(out.merge_target, torch.arange(576).expand(3, 576))
    attention = reduce_tokens(features, q_cls, keys, PruMergeConfig(mode="off")).importance
    torch.testing.assert_close(attention[0], naive_class_attention(q_cls[0], keys[0]))


def test_merge_target_names_the_kept_token_that_absorbed_each_patch_most_strongly():
    features, q_cls, keys = synthetic_inputs(2, 196, 16, "clip", seed=8)
    out = reduce_tokens(features, q_cls, keys, _config(True, k_neighbors=8))
    for b in range(2):
        kept = out.split_kept_indices()[b].tolist()
        unit = torch.nn.functional.normalize(keys[b, 1:], dim=-1)
        best: dict[int, tuple[float, int]] = {}
        for position, i in enumerate(kept):
            similarity = unit @ unit[i]
            similarity[i] = -float("inf")
            for j in similarity.topk(8).indices.tolist():
                value = float(similarity[j])
                if j not in best or value > best[j][0]:
                    best[j] = (value, position)
        for patch in range(196):
            if patch in kept:
                expected = kept.index(patch)
            else:
                expected = best[patch][1] if patch in best else len(kept)
            assert int(out.merge_target[b, patch]) == expected, patch


def test_odd_attention_never_raises():
    features, q_cls, keys = synthetic_inputs(3, 64, 8, "random", seed=0)
    keys[0, 5] = float("inf")
    keys[1] = float("nan")
    q_cls[2] = 1e30
    for mode in ("prumerge", "prumerge+"):
        out = reduce_tokens(features, q_cls, keys, PruMergeConfig(mode=mode))
        assert torch.all(out.num_kept >= 1)
        assert out.features.shape[0] == sum(out.host_lengths)


def test_the_reduction_is_deterministic():
    features, q_cls, keys = synthetic_inputs(4, 576, 32, "clip", seed=0)
    first = reduce_tokens(features, q_cls, keys, _config(True))
    second = reduce_tokens(features, q_cls, keys, _config(True))
    assert torch.equal(first.features, second.features)
    assert torch.equal(first.kept_indices, second.kept_indices)


HALF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_half_precision_inputs_give_the_float32_result_rounded_to_their_dtype(dtype, plus):
    """Statistics and merge run in float32: the output is the float32 reference on the upcast
    inputs, rounded once (within 1 ulp of the dtype)."""
    eps = HALF[dtype]
    for seed in range(4):
        features, q_cls, keys = synthetic_inputs(2, 576, 64, "clip", seed=seed, dtype=dtype)
        out = reduce_tokens(features, q_cls, keys, _config(plus))
        assert out.features.dtype == dtype and out.importance.dtype == torch.float32
        for b in range(2):
            tokens, kept, _ = naive_prumerge(
                features[b], q_cls[b], keys[b], plus=plus, dtype=torch.float32
            )
            assert out.split_kept_indices()[b].tolist() == kept
            torch.testing.assert_close(
                out.split()[b].float(), tokens.to(dtype).float(), rtol=2 * eps, atol=1e-6
            )


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
def test_half_precision_kept_sets_match_the_half_precision_reference_off_the_fence(dtype, plus):
    """Against the reference computed in half precision throughout: the same kept tokens unless
    an attention value is within 4 ulp of the fence (there the two roundings legitimately
    disagree; such seeds are skipped, 4 others are checked). Merged features then agree loosely:
    both sides round differently, and a neighbour whose cosine is within half-precision
    resolution of the k-th may swap. Tolerances (relative L2): extra token 2% (bf16) / 0.5%
    (fp16); median kept token 1% / 0.2%; at least 90% of kept tokens within 1%; none beyond 25%.
    """
    eps = HALF[dtype]
    checked = 0
    for seed in range(200):
        features, q_cls, keys = synthetic_inputs(1, 576, 32, "random", seed=seed, dtype=dtype)
        attn = naive_class_attention(q_cls[0], keys[0])
        fence = naive_upper_fence(attn)
        if np.min(np.abs(attn.float().numpy() - fence)) <= 4 * eps * fence:
            continue
        if plus and _reference_crashes(attn, 576):
            continue
        out = reduce_tokens(features, q_cls, keys, _config(plus))
        tokens, kept, _ = naive_prumerge(features[0], q_cls[0], keys[0], plus=plus)
        ours = out.kept_indices.tolist()
        assert set(ours) == set(kept)
        rows = [ours.index(i) for i in kept] + [len(ours)]
        error = (out.features[rows].float() - tokens.float()).norm(dim=-1)
        relative = error / tokens.float().norm(dim=-1)
        assert relative[-1] < (0.02 if dtype == torch.bfloat16 else 0.005)
        assert relative[:-1].median() < (0.01 if dtype == torch.bfloat16 else 0.002)
        assert (relative[:-1] < 0.01).float().mean() >= 0.9
        assert relative.max() < 0.25
        checked += 1
        if checked == 4:
            return
    pytest.fail(f"only {checked} of 200 seeds were off the fence")


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+", "off"])
def test_an_empty_batch_gives_an_empty_result(mode):
    empty = torch.zeros(0, 9, 4), torch.zeros(0, 4), torch.zeros(0, 10, 4)
    out = reduce_tokens(*empty, PruMergeConfig(mode=mode))
    assert out.features.shape == (0, 4) and out.split() == [] and out.host_lengths == ()


def test_mismatched_shapes_raise_value_errors_naming_the_tensor():
    features, q_cls, keys = synthetic_inputs(2, 16, 8, "random")
    with pytest.raises(ValueError, match="keys"):
        reduce_tokens(features, q_cls, keys[:, 1:])
    with pytest.raises(ValueError, match="q_cls"):
        reduce_tokens(features, q_cls[:1], keys)
    with pytest.raises(ValueError, match="features"):
        reduce_tokens(features[0], q_cls, keys)
    with pytest.raises(ValueError, match="needs q_cls and keys"):
        reduce_tokens(features, None, None)


def test_the_default_config_is_reference_prumerge():
    features, q_cls, keys = synthetic_inputs(1, 576, 16, "clip", seed=3)
    default = reduce_tokens(features, q_cls, keys)
    explicit = reduce_tokens(features, q_cls, keys, PruMergeConfig(mode="prumerge"))
    assert torch.equal(default.features, explicit.features)
