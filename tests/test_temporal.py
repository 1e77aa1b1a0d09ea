"""The temporal stage and the `max_tokens` ceiling, as pure math (no engine, no tower).

`evs` is pinned against vLLM's own `compute_retention_mask` on the same features; `adaptive`
against the plain float64 loop of tests/hf_reference.py and a hand-worked anchor example; the
identities of a static video and a cut against the per-frame reduction of the frames that
remain; `max_tokens` against a plain sort of the uncapped selection.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.hf_reference import reference_retention
from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import (
    adaptive_retention_mask,
    evs_retained_count,
    evs_retention_mask,
    reduce_by_importance,
    reduce_frames,
    reduce_retained,
    select_tokens,
)
from vllm_prumerge.serving.options import request_config


def _video(frames: int, side: int, width: int, seed: int, drift: float = 0.3) -> torch.Tensor:
    """`[T, side * side, width]` features of a drifting scene: each frame the previous plus
    noise, so some patches change little and some a lot."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(side * side, width, generator=generator)
    steps = [first]
    for _ in range(frames - 1):
        scale = drift * torch.rand(side * side, 1, generator=generator) ** 3
        steps.append(steps[-1] + scale * torch.randn(side * side, width, generator=generator))
    return torch.stack(steps)


def _frame_inputs(features: torch.Tensor, seed: int):
    """Importance `[T, N]` and keys `[T, N, D]` to go with `features` (a tower would give them)."""
    generator = torch.Generator().manual_seed(seed)
    frames, patches, _ = features.shape
    importance = torch.rand(frames, patches, generator=generator) ** 4
    keys = torch.randn(frames, patches, 8, generator=generator)
    return importance, keys


# --- evs: vLLM's own function --------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize(
    "frames, side, dtype", [(1, 4, torch.float32), (8, 6, torch.float32), (5, 3, torch.bfloat16)]
)
def test_evs_mask_is_vllms_compute_retention_mask(frames, side, dtype, rate):
    from vllm.multimodal.video_prune.evs import compute_retention_mask

    features = _video(frames, side, 16, seed=frames * 10 + side).to(dtype)
    features[frames // 2] = features[frames // 2 - 1]  # a static pair: dissimilarity ties at ~0
    ours = evs_retention_mask(features, rate)
    flat = features.float().reshape(frames * side * side, -1)
    theirs = compute_retention_mask(flat, (frames, side, side), 1, rate)
    assert torch.equal(ours.reshape(-1), theirs)
    assert ours[0].all()


@pytest.mark.parametrize("patches, frames, rate", [(576, 32, 0.75), (729, 8, 0.5), (256, 3, 0.9)])
def test_evs_keeps_vllms_retained_count(patches, frames, rate):
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    assert evs_retained_count(patches, frames, rate) == compute_retained_tokens_count(
        patches, frames, rate
    )


# --- adaptive ----------------------------------------------------------------------------------


def test_adaptive_compares_with_the_anchor_not_the_previous_frame():
    """One patch turning 10 degrees a frame, then 5: at threshold cos(25 deg) ~ 0.906 it is
    dropped while within 25 degrees of the last frame that kept it."""
    angles = [0, 10, 20, 30, 35, 40, 60]
    radians = [math.radians(a) for a in angles]
    features = torch.tensor([[[math.cos(r), math.sin(r)]] for r in radians])
    mask = adaptive_retention_mask(features, math.cos(math.radians(25)))
    # 10, 20 within 25 of 0; 30 not (anchor 30); 35, 40 within 25 of 30; 60 not.
    assert mask[:, 0].tolist() == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 0.97, 0.999])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_mask_equals_the_plain_float64_loop(threshold, seed):
    features = _video(10, 5, 24, seed=seed, drift=0.6)
    features[4] = features[3]  # a static pair
    config = PruMergeConfig(temporal="adaptive", temporal_threshold=threshold)
    ours = adaptive_retention_mask(features, threshold)
    assert torch.equal(ours, reference_retention(features, config))
    assert ours[0].all()


# --- the frames' reduction on retained patches -------------------------------------------------

TEMPORAL = {
    "adaptive": PruMergeConfig(temporal="adaptive"),
    "evs-0.75": PruMergeConfig(temporal="evs", temporal_rate=0.75),
    "adaptive-prumerge+": PruMergeConfig(mode="prumerge+", temporal="adaptive"),
    "evs-fixed": PruMergeConfig(mode="fixed", budget=7, temporal="evs", temporal_rate=0.75),
}


def _two_scenes(patches: int = 64):
    a = _video(1, int(patches**0.5), 32, seed=3)[0]
    b = -a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4))  # a cut
    importance, keys = _frame_inputs(torch.stack([a, b]), seed=5)
    return (a, b), importance, keys


@pytest.mark.parametrize("name", list(TEMPORAL))
def test_a_cut_costs_what_its_two_scenes_cost_frame_by_frame(name):
    """AAAABBBB = AB with `temporal="off"`: the first frame of each scene whole, nothing else."""
    config = TEMPORAL[name]
    (a, b), importance, keys = _two_scenes()
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosines.max() < config.temporal_threshold  # no patch of B within the threshold of A's
    order = [0, 0, 0, 0, 1, 1, 1, 1]
    video = reduce_frames(torch.stack([a, b])[order], importance[order], keys[order], config)
    pair = reduce_by_importance(
        torch.stack([a, b]), importance, keys, config.replace(temporal="off")
    )
    assert video.host_lengths == (pair.host_lengths[0], 0, 0, 0, pair.host_lengths[1], 0, 0, 0)
    assert torch.equal(video.features, pair.features)
    assert (video.merge_target[[1, 2, 3, 5, 6, 7]] == -1).all()


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
def test_identical_frames_cost_exactly_one_frame_with_adaptive(mode):
    (a, _), importance, keys = _two_scenes()
    frames = a.expand(8, -1, -1)
    config = PruMergeConfig(mode=mode, temporal="adaptive")
    video = reduce_frames(frames, importance[:1].expand(8, -1), keys[:1].expand(8, -1, -1), config)
    alone = reduce_by_importance(a[None], importance[:1], keys[:1], config.replace(temporal="off"))
    assert video.host_lengths == alone.host_lengths + (0,) * 7
    assert torch.equal(video.features, alone.features)


def test_a_frame_is_reduced_on_its_retained_patches_as_if_they_were_the_whole_frame():
    features = _video(1, 8, 16, seed=7)
    importance, keys = _frame_inputs(features, seed=8)
    retained = torch.rand(64, generator=torch.Generator().manual_seed(9)) < 0.4
    index = retained.nonzero()[:, 0]
    config = PruMergeConfig(mode="prumerge+", k_neighbors=5)
    ours = reduce_retained(features, importance, keys, retained, config)
    alone = reduce_by_importance(
        features[:, index], importance[:, index], keys[:, index], config
    )  # the retained patches as a frame of their own
    assert torch.equal(ours.features, alone.features)
    assert ours.kept_indices.tolist() == index[alone.kept_indices].tolist()
    assert set(ours.kept_indices.tolist()) <= set(index.tolist())
    assert ((ours.merge_target[0] == -1) == ~retained).all()
    none = reduce_retained(features, importance, keys, torch.zeros(64, dtype=torch.bool), config)
    assert none.host_lengths == (0,) and none.features.shape == (0, 16)


def test_temporal_off_is_the_per_frame_reduction():
    features = _video(4, 6, 16, seed=11)
    importance, keys = _frame_inputs(features, seed=12)
    config = PruMergeConfig(mode="prumerge+")
    video = reduce_frames(features, importance, keys, config)
    frames = [
        reduce_by_importance(features[t : t + 1], importance[t : t + 1], keys[t : t + 1], config)
        for t in range(4)
    ]
    assert video.host_lengths == tuple(f.host_lengths[0] for f in frames)
    assert torch.equal(video.features, torch.cat([f.features for f in frames]))


def test_evs_keeps_the_video_share_the_rate_leaves():
    features = _video(6, 6, 16, seed=13)
    importance, keys = _frame_inputs(features, seed=14)
    config = PruMergeConfig(mode="fixed", budget=36, temporal="evs", temporal_rate=0.5)
    video = reduce_frames(features, importance, keys, config)  # fixed 36 = every retained patch
    retained = evs_retention_mask(features, 0.5).sum(1)
    assert int(retained.sum()) == 6 * 36 // 2
    assert video.host_num_kept == tuple(retained.tolist())
    assert video.host_lengths == tuple(n + 1 if n else 0 for n in retained.tolist())


# --- max_tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "prumerge", "iqr_multiplier": 0.0},
        {"mode": "prumerge+"},
        {"mode": "fixed", "budget_ratio": 0.5, "spatial_samples": True},
        {"mode": "prumerge+", "iqr_multiplier": 4.0},
    ],
)
@pytest.mark.parametrize("cap", [1, 3, 10, 40])
def test_max_tokens_keeps_the_highest_importance_of_the_uncapped_selection(options, cap):
    generator = torch.Generator().manual_seed(cap)
    importance = torch.rand(3, 81, generator=generator) ** 3
    importance[1, :20] = importance[1, 20]  # ties: lower index first
    uncapped = select_tokens(importance, PruMergeConfig(**options))
    capped = select_tokens(importance, PruMergeConfig(**options, max_tokens=cap))
    for b in range(3):
        kept = uncapped.kept[b].nonzero()[:, 0].tolist()
        expected = sorted(kept, key=lambda i: (-float(importance[b, i]), i))[:cap]
        assert sorted(capped.kept[b].nonzero()[:, 0].tolist()) == sorted(expected)
        assert int(capped.num_kept[b]) == min(len(kept), cap)
        # Attention-selected patches outrank spatial samples: they fill the ceiling first.
        assert int(capped.num_outliers[b]) == min(int(uncapped.num_outliers[b]), cap)


def test_max_tokens_caps_the_reduced_length():
    features = _video(1, 9, 16, seed=21).expand(2, -1, -1)
    importance, keys = _frame_inputs(features, seed=22)
    out = reduce_by_importance(
        features, importance, keys, PruMergeConfig(mode="prumerge+", max_tokens=4)
    )
    assert out.host_lengths == (5, 5)


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"temporal": "sometimes"}, "temporal"),
        ({"temporal": "evs", "mode": "off"}, "temporal"),
        ({"temporal_rate": 1.0}, "temporal_rate"),
        ({"temporal_rate": -0.1}, "temporal_rate"),
        ({"temporal_threshold": 1.0}, "temporal_threshold"),
        ({"temporal_threshold": -0.5}, "temporal_threshold"),
        ({"temporal_threshold": math.nan}, "temporal_threshold"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": 8, "mode": "off"}, "max_tokens"),
        ({"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"max_tokens": 2, "mode": "fixed", "budget": 3}, "budget"),
    ],
)
def test_invalid_temporal_and_ceiling_options_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"PruMergeConfig\.{field}\b"):
        PruMergeConfig(**overrides)


def test_temporal_options_coerce_from_strings():
    config = PruMergeConfig.from_dict(
        {
            "temporal": "ADAPTIVE",
            "temporal_threshold": "0.8",
            "temporal_rate": "0.5",
            "max_tokens": "12",
        }
    )
    assert (
        config.temporal,
        config.temporal_threshold,
        config.temporal_rate,
        config.max_tokens,
    ) == (
        "adaptive",
        0.8,
        0.5,
        12,
    )
    assert PruMergeConfig.from_dict({"max_tokens": "none"}).max_tokens is None
    assert PruMergeConfig().temporal == "off" and PruMergeConfig().max_tokens is None


def test_a_request_may_lower_the_engines_ceiling_but_not_lift_it():
    engine = PruMergeConfig(max_tokens=16, temporal="adaptive")
    assert request_config(engine, {"max_tokens": 4}).max_tokens == 4
    assert request_config(engine, "prumerge+").max_tokens == 16
    for value in ({"max_tokens": 17}, {"max_tokens": None}):
        with pytest.raises(ValueError, match="max_tokens"):
            request_config(engine, value)
    with pytest.raises(ValueError, match="mode 'off'"):
        request_config(engine, "off")


def test_a_request_for_mode_off_drops_the_engines_temporal_stage():
    engine = PruMergeConfig(temporal="evs")
    assert request_config(engine, "off") == PruMergeConfig(mode="off")
    assert request_config(engine, {"temporal": "adaptive"}).temporal == "adaptive"
    with pytest.raises(ValueError, match="temporal"):
        request_config(engine, {"mode": "off", "temporal": "evs"})


def test_engine_options_override_a_checkpoints_own_ceiling():
    own = PruMergeConfig(max_tokens=16, temporal="evs")
    assert request_config(own, {"max_tokens": 64}, ceiling=False).max_tokens == 64
    assert request_config(own, "off", ceiling=False) == PruMergeConfig(mode="off")
