"""The plugin's Prometheus histograms: visual-token buckets derived from the served family.

The stock maxima the buckets must cover come from vLLM's own processing info for the same
checkpoint without the plugin (an independent path), at the generated checkpoints' pinpoints and
at the hub checkpoints' (llava-hf LLaVA-NeXT's five grids, LLaVA-OneVision's 6x6 of 384 px tiles).
No engine starts: only vLLM's model config and multimodal processor are built.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from PIL import Image

from tests.helpers import family_checkpoint, vllm_processor
from vllm_prumerge.serving import metrics as metrics_module
from vllm_prumerge.serving.metrics import TOKENS_METRIC, PruMergeMetrics, token_buckets
from vllm_prumerge.testing.prometheus import histogram_buckets, parse_prometheus

# The hub checkpoints' grids ([height, width]): llava-hf/llava-v1.6-*, llava-onevision-*.
HUB_PINPOINTS = {
    "llava_next": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "onevision": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
}


def processor(checkpoint: str, plugin: bool):
    """vLLM's multimodal processor for the checkpoint, with or without the plugin."""
    options = {"mode": "off"} if plugin else {}
    return vllm_processor(checkpoint, plugin=plugin, **options)[0]


def stock_maximum(info) -> int:
    """The most visual tokens stock vLLM gives one image of this checkpoint: at its worst-case
    image size and at every pinpoint's size (anyres families)."""
    pinpoints = getattr(info.get_hf_config(), "image_grid_pinpoints", None) or []
    at_pinpoints = [info.get_num_image_tokens(image_width=w, image_height=h) for h, w in pinpoints]
    return max([info.get_max_image_tokens(), *at_pinpoints])


def hub_shaped(family: str, tmp_path_factory) -> str:
    """A copy of the family's generated checkpoint with the hub checkpoints' pinpoints."""
    copy = tmp_path_factory.mktemp(family + "-hub-pinpoints") / "checkpoint"
    shutil.copytree(family_checkpoint(family, tmp_path_factory), copy)
    config = json.loads((copy / "config.json").read_text())
    config["image_grid_pinpoints"] = HUB_PINPOINTS[family]
    (copy / "config.json").write_text(json.dumps(config))
    processor_config = json.loads((copy / "processor_config.json").read_text())
    processor_config["image_processor"]["image_grid_pinpoints"] = HUB_PINPOINTS[family]
    (copy / "processor_config.json").write_text(json.dumps(processor_config))
    return str(copy)


@pytest.fixture(
    scope="module",
    params=[
        "llava",
        "siglip",
        "llava_next",
        "onevision",
        "llava_next with hub pinpoints",
        "onevision with hub pinpoints",
    ],
)
def checkpoint(request, tmp_path_factory) -> str:
    family, _, variant = request.param.partition(" with ")
    if variant:
        return hub_shaped(family, tmp_path_factory)
    return family_checkpoint(family, tmp_path_factory)


def test_the_ladder_is_every_power_of_two_and_one_and_a_half_times_it_up_to_the_largest():
    reference = sorted({2**k for k in range(20)} | {3 * 2**k for k in range(19)})
    for largest in (1, 2, 5, 32, 577, 2928, 7371):
        expected = [edge for edge in reference if edge < largest]
        expected.append(min(edge for edge in reference if edge >= largest))
        assert list(token_buckets(largest)) == expected
    assert {32, 128, 192, 768} <= set(token_buckets(577))
    with pytest.raises(ValueError, match="positive"):
        token_buckets(0)


def test_every_familys_stock_maximum_lies_below_the_last_finite_edge(checkpoint):
    stock = stock_maximum(processor(checkpoint, plugin=False).info)
    edges = token_buckets(processor(checkpoint, plugin=True).info.largest_item_tokens)
    assert stock <= edges[-1]


@pytest.mark.parametrize(
    "family, side, known", [("llava_next", 672, 2928), ("onevision", 2304, 7371)]
)
def test_hub_pinpoints_reproduce_the_stock_counts_measured_on_stock_servers(
    family, side, known, tmp_path_factory
):
    """2,928 tokens for a 672x672 image on llava-hf LLaVA-NeXT, 7,371 for 2304x2304 on
    LLaVA-OneVision (stock `vllm serve`, see the environment notes): the copies are hub-shaped."""
    info = processor(hub_shaped(family, tmp_path_factory), plugin=False).info
    assert info.get_num_image_tokens(image_width=side, image_height=side) == known
    assert stock_maximum(info) >= known


def test_a_stock_next_image_in_off_mode_is_counted_in_a_finite_bucket(tmp_path_factory):
    """Through vLLM's processor with the plugin (the path a server's pre-processor takes), into a
    registry of its own: the observation is the stock count and its bucket is finite."""
    from prometheus_client import CollectorRegistry, generate_latest
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    checkpoint = family_checkpoint("llava_next", tmp_path_factory)
    plugin = processor(checkpoint, plugin=True)
    stock_count = processor(checkpoint, plugin=False).info.get_num_image_tokens(
        image_width=672, image_height=672
    )
    registry = CollectorRegistry()
    own = PruMergeMetrics(registry)
    inputs = ProcessorInputs(
        prompt=plugin.info.get_tokenizer().encode("USER: <image>\nWhat is this? ASSISTANT:"),
        mm_data_items=plugin.info.parse_mm_data({"image": [Image.new("RGB", (672, 672))]}),
        hf_processor_mm_kwargs={},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics_module, "metrics", lambda: own)
        plugin.apply(inputs, TimingContext())

    samples = parse_prometheus(generate_latest(registry).decode())
    buckets = histogram_buckets(samples, TOKENS_METRIC, mode="off")
    finite = [edge for edge in buckets if edge != math.inf]
    first_holding = min(edge for edge in finite if buckets[edge] == 1)
    assert stock_count == 2928
    assert first_holding == min(edge for edge in finite if edge >= stock_count)
    assert samples[TOKENS_METRIC + "_sum"] == [({"mode": "off"}, float(stock_count))]
