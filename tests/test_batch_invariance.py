"""Same answer in any company: an image's reduced features and count are bit-identical whatever
else is in its request and whatever vLLM's processor cache holds, for every family.

Pinned at two levels:

- the reduction core (`reduce_by_importance`): an image's result alone equals its rows of a
  batch, bit for bit (random scores, and flat images whose merge neighbours are near-ties);
- vLLM's own multimodal processor with the plugin, per family, as a server builds it (no
  engine): the features vLLM would send to the engine for image X processed alone equal those
  of X after other images in one request, and those of X served from the processor cache (a hit
  after X was first processed in other company). The comparison is `torch.equal`, not a
  tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import apply_processor, family_checkpoint, run_python, vllm_processor
from vllm_prumerge import PruMergeConfig
from vllm_prumerge.reduction import reduce_by_importance
from vllm_prumerge.serving.base import FEATURES_KEY

FAMILIES = ["llava", "llava_next", "siglip", "onevision", "video_llava"]
MODES = ["prumerge", "prumerge+"]


# -- the reduction core ---------------------------------------------------------------------


def _assert_same(alone, together, index: int) -> None:
    assert alone.host_lengths[0] == together.host_lengths[index]
    assert torch.equal(alone.features, together.split()[index])
    assert torch.equal(alone.kept_indices, together.split_kept_indices()[index])
    assert torch.equal(alone.merge_target[0], together.merge_target[index])


@pytest.mark.parametrize("mode", MODES)
def test_an_images_reduction_is_bit_identical_alone_and_in_a_batch(mode):
    generator = torch.Generator().manual_seed(0)
    batch, patches, width = 5, 576, 48
    features = torch.randn(batch, patches, width, generator=generator)
    keys = torch.randn(batch, patches, 32, generator=generator)
    # Peaked importance with different outlier counts per image: different padding widths.
    importance = torch.rand(batch, patches, generator=generator) ** torch.arange(2, 2 + batch)[
        :, None
    ].float().mul(4)
    config = PruMergeConfig(mode=mode)
    together = reduce_by_importance(features, importance, keys, config)
    assert len(set(together.host_lengths)) > 1  # companions of different kept counts
    for i in range(batch):
        alone = reduce_by_importance(
            features[i : i + 1], importance[i : i + 1], keys[i : i + 1], config
        )
        _assert_same(alone, together, i)


def test_a_flat_image_with_near_tied_neighbours_is_bit_identical_in_any_company():
    """A flat image's keys differ only in their last bits, so its merge neighbours are near-ties
    (the case that used to flip with the batch's padding width)."""
    generator = torch.Generator().manual_seed(1)
    patches, width = 576, 32
    base = torch.randn(1, 1, width, generator=generator)
    flat_keys = base + 1e-6 * torch.randn(1, patches, width, generator=generator)
    flat_features = base.expand(1, patches, width) + 1e-4 * torch.randn(
        1, patches, width, generator=generator
    )
    flat_importance = torch.full((1, patches), 1.0 / patches)
    flat_importance[0, :6] = 0.05
    noisy_features = torch.randn(3, patches, width, generator=generator)
    noisy_keys = torch.randn(3, patches, width, generator=generator)
    noisy_importance = torch.rand(3, patches, generator=generator) ** 8
    config = PruMergeConfig()
    alone = reduce_by_importance(flat_features, flat_importance, flat_keys, config)
    for position in range(4):
        features = torch.cat([noisy_features[:position], flat_features, noisy_features[position:]])
        keys = torch.cat([noisy_keys[:position], flat_keys, noisy_keys[position:]])
        importance = torch.cat(
            [noisy_importance[:position], flat_importance, noisy_importance[position:]]
        )
        _assert_same(alone, reduce_by_importance(features, importance, keys, config), position)


# -- vLLM's processor with the plugin, every family ------------------------------------------


def _noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def subject(scenes):
    """The image under test and its companions: the flat black image of the issue's report
    (128x128 after a 200x300 noise image on LLaVA-NeXT), a scene, and noise of other sizes."""
    return {
        "black": Image.new("RGB", (128, 128)),
        "scene": scenes[4],
        "companions": [_noise(200, 300, 0), scenes[2].resize((700, 500)), _noise(64, 500, 1)],
    }


class _Processor:
    """vLLM's multimodal processor for a checkpoint with the plugin, as the server builds it
    (shared for the session, tests/helpers.py), with a processor-only cache of its own."""

    def __init__(self, checkpoint: str):
        from vllm.multimodal.cache import MultiModalProcessorOnlyCache

        self.processor, model_config = vllm_processor(checkpoint, mode="prumerge")
        self.cache = MultiModalProcessorOnlyCache(model_config)

    def features(self, images, mode: str, cached: bool) -> list[torch.Tensor]:
        """The features vLLM would send to the engine for each image of one prompt."""
        cache = self.cache if cached else None
        result = apply_processor(self.processor, images, mode, text="Describe.", cache=cache)
        return [item[FEATURES_KEY].data for item in result["mm_kwargs"]["image"]]


@pytest.fixture(scope="module", params=FAMILIES)
def family_processor(request, tmp_path_factory):
    return request.param, _Processor(family_checkpoint(request.param, tmp_path_factory))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["black", "scene"])
def test_features_are_bit_identical_alone_after_other_images_and_from_the_cache(
    family_processor, subject, mode, which
):
    _, proc = family_processor
    image, companions = subject[which], subject["companions"]
    (alone,) = proc.features([image], mode, cached=False)
    after_others = proc.features([*companions, image], mode, cached=False)[-1]
    # First sight in other company fills the cache; the second request is served from it.
    first_sight = proc.features([companions[0], image], mode, cached=True)[-1]
    before = proc.cache.make_stats()
    from_cache = proc.features([image], mode, cached=True)[0]
    hits = proc.cache.make_stats() - before
    assert hits.hits == 1  # the image really came from vLLM's processor cache
    for other in (after_others, first_sight, from_cache):
        assert other.shape == alone.shape
        assert torch.equal(other, alone)


@pytest.mark.script
def test_the_cost_benchmark_times_both_paths_and_names_the_machine(tmp_path):
    """`benchmarks/bench_reduction.py invariance` on a tiny tower runs both paths and reports their
    cost and the machine (bit identity itself is pinned by the tests above, not by the
    script's own verdict)."""
    import json
    from pathlib import Path

    out = tmp_path / "cost.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_reduction.py"
    run_python(
        [script, "invariance", "--tower", "tiny", "--images", "3", "--repeats", "1", "--out", out]
    )
    report = json.loads(out.read_text())
    assert isinstance(report["bit_identical"], bool)
    assert report["environment"]["cpu_line"].startswith("CPU: ")
    assert set(report["results"]) == {"batched", "per_image"}
    assert all(r["cpu_s"] > 0 for r in report["results"].values())
