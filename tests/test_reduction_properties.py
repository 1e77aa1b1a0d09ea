"""Properties of the reduction that hold for every input and every valid configuration."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import ReducedTokens, reduce_tokens
from vllm_prumerge.testing.naive_reference import INPUT_KINDS, synthetic_inputs

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
TOL = {"atol": 1e-5, "rtol": 1e-5}


@st.composite
def configs(draw, n_patches: int) -> PruMergeConfig:
    mode = draw(st.sampled_from(["prumerge", "prumerge+", "fixed"]))
    options = {
        "mode": mode,
        "k_neighbors": draw(st.integers(1, 40)),
        "min_tokens": draw(st.integers(0, n_patches + 3)),
        "order": draw(st.sampled_from(["reference", "raster"])),
        "merge_weighting": draw(st.sampled_from(["reference", "normalized"])),
    }
    if mode == "fixed":
        if draw(st.booleans()):
            options["budget"] = draw(st.integers(0, n_patches + 3))
        else:
            options["budget_ratio"] = draw(st.floats(0.001, 1.0))
        options["spatial_samples"] = draw(st.booleans())
    else:
        options["iqr_multiplier"] = draw(st.floats(0.0, 4.0))
    return PruMergeConfig(**options)


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 4))
    n_patches = draw(st.integers(1, 80))
    width = draw(st.integers(2, 16))
    kind = draw(st.sampled_from(INPUT_KINDS))
    seed = draw(st.integers(0, 2**16))
    inputs = synthetic_inputs(batch, n_patches, width, kind, seed=seed)
    return inputs, draw(configs(n_patches))


def _per_image(out: ReducedTokens):
    return list(zip(out.split(), out.split_kept_indices(), strict=True))


@PROPERTY_SETTINGS
@given(cases())
def test_counts_lengths_and_indices_are_always_consistent(case):
    (features, q_cls, keys), config = case
    batch, n_patches, width = features.shape
    out = reduce_tokens(features, q_cls, keys, config)

    floor = min(config.min_tokens, n_patches)
    assert torch.all(out.num_outliers >= floor) and torch.all(out.num_outliers <= n_patches)
    assert torch.all(out.num_kept >= out.num_outliers) and torch.all(out.num_kept <= n_patches)
    if not config.uses_spatial_samples:
        assert torch.equal(out.num_kept, out.num_outliers)
    assert torch.equal(out.lengths, out.num_kept + 1)
    assert out.host_lengths == tuple(out.lengths.tolist())
    assert out.features.shape == (sum(out.host_lengths), width)
    assert out.features.dtype == features.dtype
    assert out.kept_indices.shape == (sum(out.host_num_kept),)
    assert out.importance.shape == (batch, n_patches)
    assert torch.isfinite(out.features).all()

    for b, (tokens, kept) in enumerate(_per_image(out)):
        assert tokens.shape[0] == kept.shape[0] + 1
        assert kept.unique().numel() == kept.numel(), "kept indices are unique"
        assert kept.numel() == 0 or (kept.min() >= 0 and kept.max() < n_patches)
        target = out.merge_target[b]
        assert target.min() >= 0 and target.max() < out.host_lengths[b]
        assert torch.equal(target[kept], torch.arange(kept.numel())), "kept: own position"


@PROPERTY_SETTINGS
@given(cases())
def test_attention_selected_tokens_are_the_top_ones_in_descending_order(case):
    (features, q_cls, keys), config = case
    config = config.replace(order="reference")
    out = reduce_tokens(features, q_cls, keys, config)
    for b, (_, kept) in enumerate(_per_image(out)):
        attention = out.importance[b]
        head = kept[: int(out.num_outliers[b])]
        values = attention[head]
        assert torch.all(values[:-1] >= values[1:])
        rest = torch.ones_like(attention, dtype=torch.bool)
        rest[head] = False
        if head.numel() and rest.any():
            assert values.min() >= attention[rest].max()
        samples = kept[int(out.num_outliers[b]) :]
        assert torch.all(samples[:-1] < samples[1:]), "spatial samples ascend"


@PROPERTY_SETTINGS
@given(cases())
def test_each_image_gets_the_same_result_alone_as_in_a_batch(case):
    (features, q_cls, keys), config = case
    batched = reduce_tokens(features, q_cls, keys, config)
    for b, (tokens, kept) in enumerate(_per_image(batched)):
        alone = reduce_tokens(features[b : b + 1], q_cls[b : b + 1], keys[b : b + 1], config)
        assert torch.equal(alone.kept_indices, kept)
        assert torch.equal(alone.merge_target[0], batched.merge_target[b])
        torch.testing.assert_close(alone.features, tokens, **TOL)


@PROPERTY_SETTINGS
@given(cases())
def test_raster_order_is_a_permutation_of_reference_order(case):
    (features, q_cls, keys), config = case
    reference = reduce_tokens(features, q_cls, keys, config.replace(order="reference"))
    raster = reduce_tokens(features, q_cls, keys, config.replace(order="raster"))
    assert reference.host_lengths == raster.host_lengths
    pairs = zip(_per_image(reference), _per_image(raster), strict=True)
    for (ref_tokens, ref_kept), (ras_tokens, ras_kept) in pairs:
        assert torch.equal(ras_kept, ref_kept.sort().values)
        permutation = ref_kept.argsort()
        torch.testing.assert_close(ras_tokens[:-1], ref_tokens[:-1][permutation], **TOL)
        torch.testing.assert_close(ras_tokens[-1], ref_tokens[-1], **TOL)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(cases(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_inputs_keep_the_same_tokens_as_their_float32_upcast(case, dtype):
    (features, q_cls, keys), config = case
    half = [t.to(dtype) for t in (features, q_cls, keys)]
    low = reduce_tokens(*half, config)
    high = reduce_tokens(*(t.float() for t in half), config)
    assert torch.equal(low.kept_indices, high.kept_indices)
    assert low.features.dtype == dtype
    assert torch.equal(low.features, high.features.to(dtype)), "float32 math, one rounding"
