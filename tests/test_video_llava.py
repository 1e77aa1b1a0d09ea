"""Video-LLaVA (images and videos) with PruMerge, offline and through `vllm serve`.

vLLM 0.32 has no Video-LLaVA model, so there is no stock engine to compare with: ONE plugin engine
(`prumerge` mode, float32; other modes per request through `mm_processor_kwargs`) is compared with
transformers, computed once per module:

- reduced modes: the same greedy tokens (log-probabilities within LOGPROB_ATOL) and counts as an
  independent transformers pipeline that reduces each image with the image tower and each frame
  with the video tower on its own (tests/hf_reference.py, which reuses only the reduction core);
- `off`: transformers' own `VideoLlavaForConditionalGeneration` end to end (its processor's prompt
  expansion, 256 tokens per image and 257 per frame, and its greedy `generate`);
- `vllm serve CKPT --plugin prumerge` (stock vLLM cannot start on it): a `video_url` MP4 costs
  the chat text plus its decoded frames' counts, one per-video histogram observation; a corrupt
  video is a 400 and images keep being served at their count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_ENGINE_ARGS
from tests.helpers import (
    chat_text_tokens,
    family_checkpoint,
    greedy,
    image_count,
    shutdown,
    start_llm,
    tokens_and_logprobs,
)
from tests.hf_reference import HFPruMergeVideoLlava
from vllm_prumerge import engine_kwargs
from vllm_prumerge.config import PruMergeConfig

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 2e-3
MAX_TOKENS = 6
IMAGE = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
VIDEO = "USER: <video>\nWhat happens in this video? ASSISTANT:"
IMAGE_AND_VIDEO = "USER: <image>\n<video>\nDoes the image appear in the video? ASSISTANT:"
ENGINE_ARGS = {
    **TINY_ENGINE_ARGS,
    "max_model_len": 4096,
    "limit_mm_per_prompt": {"image": 1, "video": 1},
}
# CLIP-L/14 at 224 px: a 16x16 patch grid.
PATCHES = (224 // 14) ** 2
REDUCED_MODES = ("prumerge", "prumerge+")


def _frames(scenes, size):
    return np.stack([np.asarray(s.convert("RGB").resize(size)) for s in scenes])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return family_checkpoint("video_llava", tmp_path_factory)


@pytest.fixture(scope="module")
def media(scenes):
    """Two videos of different frame counts and sizes (`[T, H, W, 3]` uint8), and an image."""
    return {
        "a": _frames(scenes[0:4], (320, 240)),
        "b": _frames(scenes[4:7], (224, 300)),
        "image": scenes[7].resize((500, 400)),
    }


def _cases(media):
    """(prompt, images, videos): an image alone, each video alone, an image with a video."""
    a, b, image = media["a"], media["b"], media["image"]
    return [
        (IMAGE, [image], []),
        (VIDEO, [], [a]),
        (VIDEO, [], [b]),
        (IMAGE_AND_VIDEO, [image], [b]),
    ]


def _requests(media, mode):
    """One mixed batch of vLLM prompt dicts (`mode` per request; None: the engine's)."""
    extra = {} if mode is None else {"mm_processor_kwargs": {"prumerge": mode}}
    requests = []
    for prompt, images, videos in _cases(media):
        data = {}
        if images:
            data["image"] = images[0]
        if videos:
            data["video"] = videos[0]
        requests.append({"prompt": prompt, "multi_modal_data": data, **extra})
    return requests


@pytest.fixture(scope="module")
def hf(checkpoint):
    return HFPruMergeVideoLlava(checkpoint)


@pytest.fixture(scope="module")
def reference(hf, media):
    """The transformers pipeline's (tokens, logprobs, counts) per case, for each reduced mode."""
    out = {}
    for mode in REDUCED_MODES:
        config = PruMergeConfig(mode=mode)
        out[mode] = [
            hf.generate(
                prompt,
                images,
                [config] * len(images),
                MAX_TOKENS,
                videos=[(v, config) for v in videos],
            )
            for prompt, images, videos in _cases(media)
        ]
    return out


@pytest.fixture(scope="module")
def transformers_off(hf, media):
    """transformers' own Video-LLaVA end to end: (prompt ids, greedy tokens) per case."""
    out = []
    for prompt, images, videos in _cases(media):
        inputs = hf.processor(
            text=prompt, images=images or None, videos=videos or None, return_tensors="pt"
        )
        with torch.no_grad():
            generated = hf.model.generate(
                **inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False
            )
        ids = inputs["input_ids"][0].tolist()
        out.append((ids, generated[0, len(ids) :].tolist()))
    return out


@pytest.fixture(scope="module")
def llm(checkpoint, hf, reference, transformers_off):
    """The module's one engine (the references are computed first, without it)."""
    engine = start_llm(checkpoint, **ENGINE_ARGS, **engine_kwargs("prumerge"))
    try:
        yield engine
    finally:
        shutdown(engine)


def _counts(output, hf) -> tuple[int, int]:
    return image_count(output, hf.image_token), image_count(output, hf.video_token)


@pytest.mark.parametrize("mode", [None, "prumerge+"])
def test_reduced_images_and_videos_equal_the_transformers_pipeline(llm, hf, reference, media, mode):
    outputs = llm.generate(_requests(media, mode), greedy(MAX_TOKENS))
    expected = reference[mode or "prumerge"]
    for out, (prompt, _, _), (ref_tokens, ref_logprobs, ref_counts) in zip(
        outputs, _cases(media), expected, strict=True
    ):
        tokens, logprobs = tokens_and_logprobs(out)
        images_n, videos_n = _counts(out, hf)
        # transformers' counts in prompt order: the image (if any), then the video (if any).
        assert [n for n in (images_n, videos_n) if n] == ref_counts, prompt
        assert tokens == ref_tokens, prompt
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL), prompt
    # Content-dependent counts, per video, in one batch; reduced below stock.
    assert _counts(outputs[1], hf)[1] != _counts(outputs[2], hf)[1]
    assert 2 <= _counts(outputs[0], hf)[0] < PATCHES


def test_frames_go_through_the_video_tower_and_images_through_the_image_tower(hf, media):
    """The two towers differ on the same pixels, so the equality above tells them apart."""
    frames = hf.video_frames(media["a"])
    config = PruMergeConfig()
    by_video_tower = hf.frame_features(frames, config)
    by_image_tower = hf._reduce_crops(frames, config)  # the image tower is the default
    assert by_video_tower.shape != by_image_tower.shape or not torch.equal(
        by_video_tower, by_image_tower
    )


def test_a_video_costs_the_sum_over_its_frames_of_kept_plus_one(llm, hf, media):
    out = llm.generate(_requests(media, None)[1], greedy(MAX_TOKENS))[0]
    frames = hf.video_frames(media["a"])
    per_frame = [len(hf.frame_features(f[None], PruMergeConfig())) for f in frames]
    assert len(per_frame) == 4
    assert all(2 <= n <= PATCHES + 1 for n in per_frame), per_frame  # kept >= 1, + extra
    assert _counts(out, hf) == (0, sum(per_frame))
    assert sum(per_frame) < len(frames) * (PATCHES + 1)  # below stock (frames x 257)


def test_a_fixed_budget_applies_to_every_frame_and_image(llm, hf, media):
    budget = 5
    outputs = llm.generate(
        _requests(media, {"mode": "fixed", "budget": budget}), greedy(MAX_TOKENS)
    )
    frames = [sum(len(v) for v in videos) for _, _, videos in _cases(media)]
    assert frames == [0, 4, 3, 3]
    assert [_counts(o, hf)[1] for o in outputs] == [f * (budget + 1) for f in frames]
    assert [_counts(o, hf)[0] for o in outputs] == [budget + 1, 0, 0, budget + 1]


def test_mode_off_equals_transformers_video_llava_token_for_token(llm, hf, transformers_off, media):
    outputs = llm.generate(_requests(media, "off"), greedy(MAX_TOKENS))
    for out, (ids, generated), (prompt, images, videos) in zip(
        outputs, transformers_off, _cases(media), strict=True
    ):
        frames = sum(len(v) for v in videos)
        # Images: 256 patches (CLS dropped); videos: 257 per frame (CLS kept).
        assert _counts(out, hf) == (PATCHES * len(images), (PATCHES + 1) * frames), prompt
        assert list(out.prompt_token_ids) == ids, prompt
        assert tokens_and_logprobs(out)[0] == generated, prompt


def test_a_video_without_frames_is_refused_and_the_engine_keeps_serving(llm, media):
    request = _requests(media, None)[2]
    before = llm.generate([request], greedy(MAX_TOKENS))[0].outputs[0].token_ids
    empty = np.zeros((0, 224, 224, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="frame"):
        llm.generate([{"prompt": VIDEO, "multi_modal_data": {"video": empty}}], greedy(MAX_TOKENS))
    after = llm.generate([request], greedy(MAX_TOKENS))[0].outputs[0].token_ids
    assert list(after) == list(before)


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

    frames = hf.video_frames(media["b"])
    rows, _ = encoder.hidden_states(frames)
    with torch.no_grad():
        expected = getattr(hf.model.model, tower)(frames, output_hidden_states=True).hidden_states[
            config.vision_feature_layer
        ]
    assert [r.shape for r in rows] == [(PATCHES + 1, config.vision_config.hidden_size)] * 3
    torch.testing.assert_close(torch.stack(rows), expected, atol=1e-4, rtol=1e-4)


def test_the_two_towers_of_the_checkpoint_differ(hf):
    """Otherwise nothing here could tell a frame through the image tower from one through the
    video tower."""
    image = dict(hf.model.model.image_tower.named_parameters())
    video = dict(hf.model.model.video_tower.named_parameters())
    assert image.keys() == video.keys()
    assert any(not torch.equal(image[k], video[k]) for k in image)


# --- `vllm serve` on Video-LLaVA (a model stock vLLM 0.32 cannot start) -----------------------

QUESTION = "What happens here?"


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """(OpenAI client, model name, base URL) of `vllm serve CKPT --plugin prumerge`."""
    from openai import OpenAI

    from tests.conftest import SERVER_ARGS
    from tests.helpers import assert_served_from_this_clone
    from vllm_prumerge.testing.server import serve

    log = tmp_path_factory.mktemp("video-llava-server") / "serve.log"
    args = [*SERVER_ARGS, "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
    with serve(checkpoint, args, log_path=log) as base_url:
        assert_served_from_this_clone(log.read_text())
        client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        yield client, client.models.list().data[0].id, base_url


def _served_chat(served, part: dict, mode=None):
    client, model, _ = served
    body = {"mm_processor_kwargs": {"prumerge": mode}} if mode is not None else {}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
        max_tokens=1,
        temperature=0.0,
        extra_body=body,
    )


@pytest.mark.server
@pytest.mark.parametrize("mode", [None, "prumerge+", "off"])
def test_vllm_serve_gives_a_video_url_its_frames_counts_and_observes_it_once(
    served, hf, media, mode
):
    """`usage.prompt_tokens` = the chat text (the checkpoint's template) + the video's tokens, by
    transformers' video tower and the reduction core per decoded frame (`off`: transformers'
    257 per frame); the per-video histogram gains one observation valued at that count."""
    import base64

    from vllm_prumerge.testing.media import decode_mp4, encode_mp4
    from vllm_prumerge.testing.prometheus import fetch_metrics, metric_total

    metric = "vllm_prumerge:visual_tokens_per_video"
    mp4 = encode_mp4(media["a"])
    config = PruMergeConfig(**({"mode": mode} if mode else {}))
    expected = len(hf.video_embeds(decode_mp4(mp4), config))
    text = chat_text_tokens(hf.processor.tokenizer, hf.video_token, QUESTION, 1, "video")
    url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    before = fetch_metrics(served[2])
    reply = _served_chat(served, {"type": "video_url", "video_url": {"url": url}}, mode)
    after = fetch_metrics(served[2])
    assert reply.usage.prompt_tokens == text + expected
    if not config.enabled:
        assert expected == len(media["a"]) * (PATCHES + 1)
    delta = [
        metric_total(after, metric + s, mode=config.mode)
        - metric_total(before, metric + s, mode=config.mode)
        for s in ("_count", "_sum")
    ]
    assert delta == [1, expected]


@pytest.mark.server
def test_vllm_serve_refuses_a_corrupt_video_and_keeps_serving_images(served, hf, media):
    import base64

    from openai import BadRequestError

    from vllm_prumerge.testing.media import image_data_url

    with pytest.raises(BadRequestError) as exc:
        url = "data:video/mp4;base64," + base64.b64encode(b"not an mp4" * 64).decode()
        _served_chat(served, {"type": "video_url", "video_url": {"url": url}})
    assert exc.value.status_code == 400
    image = {"type": "image_url", "image_url": {"url": image_data_url(media["image"])}}
    text = chat_text_tokens(hf.processor.tokenizer, hf.image_token, QUESTION, 1)
    expected = len(hf.image_embeds(media["image"], PruMergeConfig()))
    assert _served_chat(served, image).usage.prompt_tokens == text + expected
