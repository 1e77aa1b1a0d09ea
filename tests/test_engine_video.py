"""Videos with PruMerge per frame, offline: LLaVA-OneVision (images and videos),
LLaVA-NeXT-Video (videos only, as vLLM's class) and Video-LLaVA (images through its image tower,
frames through its video tower; a model vLLM 0.32 lacks).

Per family, two real engines (stock vLLM, and the plugin's in `prumerge` mode; float32), the
ones test_engine.py uses for images (tests/conftest.py; Video-LLaVA's stock is transformers' own
model). Reduced videos must give the same greedy tokens (log-probabilities within LOGPROB_ATOL)
and the same count per image and per video as an independent transformers pipeline that reduces
each frame on its own (tests/hf_reference.py, which reuses the plugin's reduction core, pinned
separately against the naive reference); `off` must equal stock token for token.

Across time (option `temporal`) and under the `max_tokens` ceiling, per request on the same
engines: the same pipeline with the temporal mask by vLLM's own EVS function or a plain float64
loop (tests/hf_reference.py); a static clip must cost its one frame and a cut its two scenes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import (
    IMAGE_AND_VIDEO_PROMPT,
    VIDEO_PROMPT,
    frames,
    greedy,
    image_count,
    tokens_and_logprobs,
    visual_runs,
)
from tests.hf_reference import reference_retention, retention_margin
from vllm_prumerge.config import PruMergeConfig

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 2e-3
MAX_TOKENS = 6
TWO_VIDEOS = "USER: <video>\n<video>\nWhich video is busier? ASSISTANT:"
IMAGE = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
ENGINE_FAMILIES = ("onevision", "next_video", "video_llava")  # engines: tests/conftest.py
# Stock tokens per frame after the family's 2x2 pooling (OneVision: bilinear on SigLIP's 27x27,
# ceil(27 / 2) ** 2, plus one newline per video; NeXT-Video: average on CLIP's 24x24); Video-LLaVA
# keeps every patch of its 224 px CLIP and the CLS (16 x 16 + 1).
STOCK_FRAME_TOKENS = {"onevision": 196, "next_video": 144, "video_llava": 257}
STOCK_NEWLINES = {"onevision": 1, "next_video": 0, "video_llava": 0}


def _sampling():
    return greedy(MAX_TOKENS)


def _stock_count(family, frames: int, videos: int) -> int:
    return frames * STOCK_FRAME_TOKENS[family] + videos * STOCK_NEWLINES[family]


@pytest.fixture(scope="module")
def media(scenes):
    """Two videos of different frame counts and sizes (`[T, H, W, 3]` uint8), and an image."""
    return {
        "a": frames(scenes[0:4], (384, 384)),
        "b": frames(scenes[4:7], (320, 240)),
        "image": scenes[7].resize((500, 400)),
    }


def _requests(family, media, mode=None):
    """(prompt dict, prompt, images, videos) per request: videos alone, with an image, two
    videos, and an image alone, in one batch (NeXT-Video: one video alone per request)."""
    a, b, image = media["a"], media["b"], media["image"]
    cases = [
        (VIDEO_PROMPT, {"video": a}, [], [a]),
        (VIDEO_PROMPT, {"video": b}, [], [b]),
        (IMAGE_AND_VIDEO_PROMPT, {"image": image, "video": b}, [image], [b]),
        (TWO_VIDEOS, {"video": [a, b]}, [], [a, b]),
        (IMAGE, {"image": image}, [image], []),
    ]
    if family == "next_video":  # vLLM's class: one video, no image
        cases = cases[:2]
    if family == "video_llava":  # one video per prompt
        cases = [c for c in cases if c[0] != TWO_VIDEOS]
    extra = {} if mode is None else {"mm_processor_kwargs": {"prumerge": mode}}
    return [
        ({"prompt": p, "multi_modal_data": data, **extra}, p, imgs, vids)
        for p, data, imgs, vids in cases
    ]


@pytest.fixture(scope="module")
def stock_outputs(stock_llm, family, media):
    """Stock vLLM on the module's requests."""
    return stock_llm.generate([r[0] for r in _requests(family, media)], _sampling())


def _video_count(output, hf) -> int:
    return image_count(output, hf.video_token)


@pytest.mark.parametrize("mode", [None, "prumerge+"])
def test_reduced_videos_and_images_equal_the_transformers_pipeline_frame_by_frame(
    plugin_llm, hf, family, media, mode
):
    requests = _requests(family, media, mode)
    outputs = plugin_llm.generate([r[0] for r in requests], _sampling())
    config = PruMergeConfig(mode=mode or "prumerge")
    for out, (_, prompt, images, videos) in zip(outputs, requests, strict=True):
        ref_tokens, ref_logprobs, ref_counts = hf.generate(
            prompt,
            images,
            [config] * len(images),
            MAX_TOKENS,
            videos=[(v, config) for v in videos],
        )
        tokens, logprobs = tokens_and_logprobs(out)
        # Per image and per video, in prompt order.
        assert visual_runs(out, {hf.image_token, hf.video_token}) == ref_counts, prompt
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)


def test_a_video_costs_the_sum_over_its_frames_of_kept_plus_one(plugin_llm, hf, family, media):
    out = plugin_llm.generate([_requests(family, media)[0][0]], _sampling())[0]
    pixels = hf.video_frames(media["a"])
    per_frame = [len(hf.frame_features(f[None], PruMergeConfig())) for f in pixels]
    assert _video_count(out, hf) == sum(per_frame)
    assert _video_count(out, hf) < _stock_count(family, len(pixels), 1)


def test_a_fixed_budget_applies_to_every_frame(plugin_llm, hf, family, media):
    budget = 5
    requests = [r for r in _requests(family, media, {"mode": "fixed", "budget": budget}) if r[3]]
    outputs = plugin_llm.generate([r[0] for r in requests], _sampling())
    counts = [sum(len(v) for v in r[3]) * (budget + 1) for r in requests]
    assert [_video_count(o, hf) for o in outputs] == counts
    images = [len(r[2]) * (budget + 1) for r in requests]  # single-view families: one crop
    if family == "video_llava":
        assert [image_count(o, hf.image_token) for o in outputs] == images


def test_mode_off_videos_equal_stock_vllm_and_transformers(
    plugin_llm, stock_outputs, hf, family, media
):
    requests = _requests(family, media, "off")
    outputs = plugin_llm.generate([r[0] for r in requests], _sampling())
    off = PruMergeConfig(mode="off")
    for out, ref, (_, prompt, images, videos) in zip(outputs, stock_outputs, requests, strict=True):
        assert list(out.prompt_token_ids) == list(ref.prompt_token_ids)
        tokens, logprobs = tokens_and_logprobs(out)
        ref_tokens, ref_logprobs = tokens_and_logprobs(ref)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)
        hf_tokens, _, _ = hf.generate(
            prompt, images, [off] * len(images), MAX_TOKENS, videos=[(v, off) for v in videos]
        )
        assert tokens == hf_tokens
    for out, (_, _, _, videos) in zip(outputs, requests, strict=True):
        total = sum(len(v) for v in videos)
        assert _video_count(out, hf) == _stock_count(family, total, len(videos))


def test_each_video_is_observed_once_in_the_per_video_histogram(plugin_llm, hf, media):
    from prometheus_client import REGISTRY, generate_latest

    from vllm_prumerge.testing.prometheus import metric_total, parse_prometheus

    name = "vllm_prumerge:visual_tokens_per_video"

    def totals():
        samples = parse_prometheus(generate_latest(REGISTRY).decode())
        labels = {"mode": "prumerge"}
        return metric_total(samples, name + "_count", **labels), metric_total(
            samples, name + "_sum", **labels
        )

    before = totals()
    fresh = media["a"][::-1].copy()  # not in the processor cache: time order reversed
    out = plugin_llm.generate(
        [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": fresh}}], _sampling()
    )[0]
    after = totals()
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == _video_count(out, hf)


def test_a_video_without_frames_is_refused_and_the_engine_keeps_serving(plugin_llm, family, media):
    request = _requests(family, media)[1][0]
    before = plugin_llm.generate([request], _sampling())[0].outputs[0].token_ids
    empty = np.zeros((0, 384, 384, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="frame"):
        plugin_llm.generate(
            [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": empty}}], _sampling()
        )
    after = plugin_llm.generate([request], _sampling())[0].outputs[0].token_ids
    assert list(after) == list(before)  # still serving, and the same answer


@pytest.mark.parametrize("family", ["next_video"], indirect=True)
def test_next_video_refuses_images_as_stock_vllm_does(plugin_llm, family, media):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"At most 0 image\(s\)"):
        plugin_llm.generate(
            [{"prompt": IMAGE, "multi_modal_data": {"image": media["image"]}}], _sampling()
        )


# --- Video-LLaVA's two towers ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["video_llava"], indirect=True)
def test_the_two_towers_of_the_checkpoint_differ(hf):
    """Otherwise nothing here could tell a frame through the image tower from one through the
    video tower."""
    image = dict(hf.model.model.image_tower.named_parameters())
    video = dict(hf.model.model.video_tower.named_parameters())
    assert image.keys() == video.keys()
    assert any(not torch.equal(image[k], video[k]) for k in image)


@pytest.mark.parametrize("family", ["video_llava"], indirect=True)
@pytest.mark.parametrize("tower", ["image_tower", "video_tower"])
def test_the_encoder_loads_each_tower_and_gives_transformers_hidden_states_with_cls(
    checkpoint, hf, media, tower
):
    """The pre-processor's two encoders read their own tower's tensors, and the full hidden
    states of `off` frames (CLS kept) are transformers' own."""
    from transformers import AutoConfig

    from vllm_prumerge.encoder import PruMergeEncoder

    config = AutoConfig.from_pretrained(checkpoint)
    encoder = PruMergeEncoder(checkpoint, config.vision_config, device="cpu", tower_name=tower)
    ours = dict(encoder.tower.named_parameters())
    theirs = dict(getattr(hf.model.model, tower).named_parameters())
    assert ours and all(torch.equal(p, theirs[name]) for name, p in ours.items())

    pixels = hf.video_frames(media["b"])
    rows, _ = encoder.hidden_states(pixels)
    with torch.no_grad():
        expected = getattr(hf.model.model, tower)(pixels, output_hidden_states=True).hidden_states[
            config.vision_feature_layer
        ]
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    assert [r.shape for r in rows] == [(patches + 1, config.vision_config.hidden_size)] * 3
    torch.testing.assert_close(torch.stack(rows), expected, atol=1e-4, rtol=1e-4)


# --- Across time: the temporal stage; the max_tokens ceiling ----------------------------------
# One engine per family serves every setting (per request, `mm_processor_kwargs`).

TEMPORAL_SETTINGS = {
    "adaptive": {"temporal": "adaptive"},
    "evs-0.6-prumerge+": {"mode": "prumerge+", "temporal": "evs", "temporal_rate": 0.6},
}


@pytest.fixture(scope="module")
def scene_videos(scenes):
    """Scenes A, B and C: a static video (A x 8), A alone, a cut (A x 4 then B x 4), the pair AB,
    and AABBCA (repeats and changes)."""
    a, b, c, size = scenes[1], scenes[6], scenes[3], (336, 336)
    return {
        "static": frames([a] * 8, size),
        "one": frames([a], size),
        "cut": frames([a] * 4 + [b] * 4, size),
        "pair": frames([a, b], size),
        "repeats": frames([a, a, b, b, c, a], size),
    }


def _video_request(video, option=None) -> dict:
    extra = {} if option is None else {"mm_processor_kwargs": {"prumerge": option}}
    return {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": video}, **extra}


@pytest.mark.parametrize("setting", list(TEMPORAL_SETTINGS))
def test_temporal_videos_equal_the_transformers_pipeline(
    plugin_llm, hf, family, media, scene_videos, setting
):
    """Counts, greedy tokens and log-probabilities against transformers' towers with vLLM's own
    EVS function or a plain float64 loop for the mask (tests/hf_reference.py)."""
    option = TEMPORAL_SETTINGS[setting]
    videos = [scene_videos["repeats"]]
    config = PruMergeConfig.from_dict(option)
    dropped = 0
    # No decision within float rounding of its boundary (the plugin's SDPA tower and
    # transformers' eager one differ by ~1e-6): a fair comparison. (A slow pan on the tiny CLIP
    # towers ties EVS's dissimilarities to ~1e-6, so the test videos are cuts and repeats.)
    for video in videos:
        features = hf.video_patch_features(video)
        assert retention_margin(features, config) > 1e-4
        dropped += int((~reference_retention(features, config)).sum())
    assert dropped > 0  # the stage dropped patches: the comparison is not per-frame again
    outputs = plugin_llm.generate([_video_request(v, option) for v in videos], _sampling())
    for out, video in zip(outputs, videos, strict=True):
        ref_tokens, ref_logprobs, ref_counts = hf.generate(
            VIDEO_PROMPT, [], [], MAX_TOKENS, videos=[(video, config)]
        )
        assert [_video_count(out, hf)] == ref_counts
        tokens, logprobs = tokens_and_logprobs(out)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)


def test_a_static_video_costs_one_frame_and_a_cut_its_two_scenes(
    plugin_llm, hf, family, scene_videos
):
    """8 identical frames with `adaptive` = the one frame; AAAABBBB with `adaptive`, and with
    `evs` at 0.75 (2 of 8 frames' patches: A's first and B's first) = the 2-frame video AB
    without the temporal stage; by placeholder counts and greedy tokens."""
    pair = hf.video_patch_features(scene_videos["pair"])
    threshold = PruMergeConfig(temporal="adaptive").temporal_threshold
    similarity = torch.nn.functional.cosine_similarity(pair[0], pair[1], dim=-1)
    assert similarity.max() < threshold  # a cut: no patch of B within the threshold of A's
    adaptive, evs = {"temporal": "adaptive"}, {"temporal": "evs", "temporal_rate": 0.75}
    v = scene_videos
    requests = [
        _video_request(v["static"], adaptive),
        _video_request(v["one"]),
        _video_request(v["cut"], adaptive),
        _video_request(v["cut"], evs),
        _video_request(v["pair"]),
    ]
    outputs = plugin_llm.generate(requests, _sampling())
    counts = [_video_count(o, hf) for o in outputs]
    tokens = [tokens_and_logprobs(o)[0] for o in outputs]
    assert counts[0] == counts[1] == sum(hf.frame_counts(v["one"], PruMergeConfig()))
    assert counts[2] == counts[3] == counts[4] == sum(hf.frame_counts(v["pair"], PruMergeConfig()))
    assert tokens[0] == tokens[1]
    assert tokens[2] == tokens[3] == tokens[4]


def test_max_tokens_caps_every_image_crop_and_frame(plugin_llm, hf, family, media):
    """Each image, crop and frame keeps min(its kept patches, the ceiling) plus its extra token:
    counted from transformers' uncapped per-crop and per-frame counts; the greedy tokens of one
    request as the pipeline's own capped reduction."""
    cap = 3
    requests = _requests(family, media, {"max_tokens": cap})
    outputs = plugin_llm.generate([r[0] for r in requests], _sampling())
    uncapped, capped = PruMergeConfig(), PruMergeConfig(max_tokens=cap)
    counts = {}  # per item, uncapped per crop or frame (the module's media repeat)

    def uncapped_counts(item, image: bool) -> list[int]:
        if id(item) not in counts:
            count = hf.crop_counts if image else hf.frame_counts
            counts[id(item)] = count(item, uncapped)
        return counts[id(item)]

    lowered = 0
    for out, (_, prompt, images, videos) in zip(outputs, requests, strict=True):
        per_item = [uncapped_counts(im, True) for im in images]
        per_item += [uncapped_counts(v, False) for v in videos]  # images first in prompts
        expected = [sum(min(n - 1, cap) + 1 for n in counts) for counts in per_item]
        assert visual_runs(out, {hf.image_token, hf.video_token}) == expected, prompt
        lowered += sum(map(sum, per_item)) - sum(expected)
    assert lowered > 0  # the ceiling was below some item's count
    # The tokens of the image-and-video request (a video alone on NeXT-Video), as the pipeline's.
    index = 0 if family == "next_video" else 2
    _, prompt, images, videos = requests[index]
    ref_tokens, _, _ = hf.generate(
        prompt, images, [capped] * len(images), MAX_TOKENS, videos=[(v, capped) for v in videos]
    )
    assert tokens_and_logprobs(outputs[index])[0] == ref_tokens


def test_an_engine_ceiling_shrinks_the_bounds_vllm_profiles_with(checkpoint, family):
    """`max_tokens` at engine level: every frame, image and crop bound is `max_tokens + 1` (no
    stock count: requests may not switch to `off`); without it, every patch kept, or stock."""
    from tests.helpers import vllm_processor

    cap, seq_len = 8, 4096
    info = vllm_processor(checkpoint, max_tokens=cap)[0].info
    counts = dict.fromkeys(info.get_supported_mm_limits(), 1)
    bounds = info.get_mm_max_tokens_per_item(seq_len, counts)
    assert info.get_max_frame_tokens() == cap + 1
    assert bounds["video"] == math.ceil(seq_len / (cap + 1)) * (cap + 1)
    if family == "video_llava":
        assert bounds["image"] == cap + 1
    if family == "onevision":
        assert bounds["image"] == info.get_max_crops() * (cap + 1)
    patches = info.get_patches_per_crop()
    assert patches + 1 > cap + 1  # the ceiling is below the uncapped bound: it shrank
