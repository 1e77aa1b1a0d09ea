"""Videos with PruMerge per frame, offline: LLaVA-OneVision (images and videos) and
LLaVA-NeXT-Video (videos only, as vLLM's class).

Per family, two real engines (stock vLLM, and the plugin's in `prumerge` mode; float32), the
ones test_engine.py uses for images (tests/conftest.py). Reduced videos must
give the same greedy tokens (log-probabilities within LOGPROB_ATOL) and the same counts as an
independent transformers pipeline that reduces each frame on its own (tests/hf_reference.py,
which reuses the plugin's reduction core, pinned separately against the naive reference); `off`
must equal stock vLLM token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import greedy, image_count, tokens_and_logprobs
from vllm_prumerge.config import PruMergeConfig

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 2e-3
MAX_TOKENS = 6
VIDEO = "USER: <video>\nWhat happens in this video? ASSISTANT:"
IMAGE_AND_VIDEO = "USER: <image>\n<video>\nDoes the image appear in the video? ASSISTANT:"
TWO_VIDEOS = "USER: <video>\n<video>\nWhich video is busier? ASSISTANT:"
IMAGE = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
ENGINE_FAMILIES = ("onevision", "next_video")  # engines: tests/conftest.py
# Stock tokens per frame after the family's 2x2 pooling (OneVision: bilinear on SigLIP's 27x27,
# ceil(27 / 2) ** 2, plus one newline per video; NeXT-Video: average on CLIP's 24x24).
STOCK_FRAME_TOKENS = {"onevision": 196, "next_video": 144}
STOCK_NEWLINES = {"onevision": 1, "next_video": 0}
PATCHES = {"onevision": (384 // 14) ** 2, "next_video": (336 // 14) ** 2}


def _sampling():
    return greedy(MAX_TOKENS)


def _frames(scenes, size):
    return np.stack([np.asarray(s.convert("RGB").resize(size)) for s in scenes])


def _stock_count(family, frames: int, videos: int) -> int:
    return frames * STOCK_FRAME_TOKENS[family] + videos * STOCK_NEWLINES[family]


@pytest.fixture(scope="module")
def media(scenes):
    """Two videos of different frame counts and sizes (`[T, H, W, 3]` uint8), and an image."""
    return {
        "a": _frames(scenes[0:4], (384, 384)),
        "b": _frames(scenes[4:7], (320, 240)),
        "image": scenes[7].resize((500, 400)),
    }


def _requests(family, media, mode=None):
    """(prompt dict, prompt, images, videos) per request: videos alone, with an image, two
    videos, and an image alone, in one batch (NeXT-Video: one video alone per request)."""
    a, b, image = media["a"], media["b"], media["image"]
    cases = [
        (VIDEO, {"video": a}, [], [a]),
        (VIDEO, {"video": b}, [], [b]),
        (IMAGE_AND_VIDEO, {"image": image, "video": b}, [image], [b]),
        (TWO_VIDEOS, {"video": [a, b]}, [], [a, b]),
        (IMAGE, {"image": image}, [image], []),
    ]
    if family == "next_video":
        cases = cases[:2]
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
        visual = image_count(out, hf.image_token) + _video_count(out, hf)
        assert visual == sum(ref_counts)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)
    # Content-dependent counts, per video, in one batch.
    assert _video_count(outputs[0], hf) != _video_count(outputs[1], hf)


def test_a_video_costs_the_sum_over_its_frames_of_kept_plus_one(plugin_llm, hf, family, media):
    out = plugin_llm.generate([_requests(family, media)[0][0]], _sampling())[0]
    frames = hf.video_frames(media["a"])
    per_frame = [len(hf._reduce_crops(f[None], PruMergeConfig())) for f in frames]
    assert all(2 <= n <= PATCHES[family] + 1 for n in per_frame), per_frame  # kept >= 1, + extra
    assert _video_count(out, hf) == sum(per_frame)
    assert _video_count(out, hf) < _stock_count(family, len(frames), 1)


def test_a_fixed_budget_applies_to_every_frame(plugin_llm, hf, family, media):
    budget = 5
    requests = [r for r in _requests(family, media, {"mode": "fixed", "budget": budget}) if r[3]]
    outputs = plugin_llm.generate([r[0] for r in requests], _sampling())
    frames = [sum(len(v) for v in r[3]) for r in requests]
    assert [_video_count(o, hf) for o in outputs] == [f * (budget + 1) for f in frames]
    assert frames == ([4, 3, 3, 7] if family == "onevision" else [4, 3])


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
        frames = sum(len(v) for v in videos)
        assert _video_count(out, hf) == _stock_count(family, frames, len(videos))


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
        [{"prompt": VIDEO, "multi_modal_data": {"video": fresh}}], _sampling()
    )[0]
    after = totals()
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == _video_count(out, hf)


def test_a_video_without_frames_is_refused_and_the_engine_keeps_serving(plugin_llm, family, media):
    request = _requests(family, media)[1][0]
    before = plugin_llm.generate([request], _sampling())[0].outputs[0].token_ids
    empty = np.zeros((0, 384, 384, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="frame"):
        plugin_llm.generate([{"prompt": VIDEO, "multi_modal_data": {"video": empty}}], _sampling())
    after = plugin_llm.generate([request], _sampling())[0].outputs[0].token_ids
    assert list(after) == list(before)  # still serving, and the same answer


@pytest.mark.parametrize("family", ["next_video"], indirect=True)
def test_next_video_refuses_images_as_stock_vllm_does(plugin_llm, family, media):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"At most 0 image\(s\)"):
        plugin_llm.generate(
            [{"prompt": IMAGE, "multi_modal_data": {"image": media["image"]}}], _sampling()
        )
