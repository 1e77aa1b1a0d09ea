"""The exact user command, `vllm serve CKPT --plugin prumerge`, as a subprocess on loopback: the
session's two servers (tests/conftest.py), checked through the OpenAI client against independent
figures.

- LLaVA-1.5, with two API-server processes (`--api-server-count 2`, each with its own
  pre-processor), as a user scaling out the front end runs it: `usage.prompt_tokens` is the
  prompt's text tokens (the checkpoint's own tokenizer and chat template, in transformers) plus
  each image's visual tokens by the transformers pipeline of tests/hf_reference.py (reduced
  modes: the reduced features by the plugin's reduction core, pinned separately against the naive
  reference; `off`: transformers' own processor expansion), whichever process serves; bad input
  is answered with HTTP 400 and the server keeps serving; `/metrics` counts one observation per
  image valued at its whole count, in a finite bucket, aggregated over both processes.
- Video-LLaVA (images and videos; stock vLLM 0.32 cannot serve it): a real MP4 `video_url`
  costs the chat text plus its decoded frames' counts and one per-video histogram observation,
  per frame and across time (`temporal`, `max_tokens` per request); a corrupt or empty video is
  a 400 and the server keeps serving; a 1x1 image is served at its count.

The other families' counts are pinned offline against the same pipeline (test_engine.py,
test_engine_video.py): their servers would add nothing the engine tests do not check. Every served
process must have imported this clone's `vllm_prumerge` (its log says where from). (KV-cache
concurrency is pinned offline from vLLM's per-step stats, in test_kv_concurrency.py: sampling
the server's gauge could miss the peak.)
"""

from __future__ import annotations

import base64
import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.helpers import chat_text_tokens, frames
from tests.hf_reference import HFPruMergeLlava, HFPruMergeVideoLlava, retention_margin
from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.testing.media import decode_mp4, encode_mp4, image_data_url, video_data_url
from vllm_prumerge.testing.prometheus import fetch_metrics, histogram_buckets, metric_total

pytestmark = pytest.mark.server

QUESTION = "What is shown in this image?"
VIDEO_METRIC = "vllm_prumerge:visual_tokens_per_video"
METRIC = "vllm_prumerge:visual_tokens_per_image"
# "(APIServer pid=N) INFO ... Received request ID:", from `--enable-log-requests`.
REQUEST_LOG = re.compile(r"^\((\w+) pid=(\d+)\) INFO .*Received request (\S+?):", re.MULTILINE)


@pytest.fixture(scope="module")
def server(llava_server):
    return llava_server


def _new_client(base_url: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    return _new_client(server[0])


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def hf(tiny_llava) -> HFPruMergeLlava:
    return HFPruMergeLlava(tiny_llava)


@pytest.fixture(scope="module")
def images(scenes):
    """A square and a wide image (LLaVA-1.5 has one view, whatever the size)."""
    return [scenes[0].resize((336, 336)), scenes[1].resize((700, 300))]


def _chat(client, model, urls, mode=None, max_tokens=1):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": QUESTION})
    body = {"mm_processor_kwargs": {"prumerge": mode}} if mode is not None else {}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=body,
    )


def _chat_alone(base_url, model, image, mode):
    """One request on a client of its own (its own connection, so that concurrent requests
    spread over the API-server processes)."""
    return _chat(_new_client(base_url), model, [image_data_url(image)], mode, max_tokens=2)


def _text_tokens(hf: HFPruMergeLlava, num_images: int) -> int:
    return chat_text_tokens(hf.processor.tokenizer, hf.image_token, QUESTION, num_images)


def _visual_tokens(hf: HFPruMergeLlava, image: Image.Image, config: PruMergeConfig) -> int:
    """The independent count: the reduced crops' tokens (transformers tower + core reduction
    per crop), or in `off` the stock count, as transformers' own processor expands `<image>`."""
    if config.enabled:
        return len(hf.image_features(image, config))
    return hf.stock_image_tokens(image)


def _assert_still_serving(client, model, hf, image):
    reply = _chat(client, model, [image_data_url(image)])
    assert reply.usage.prompt_tokens == _text_tokens(hf, 1) + _visual_tokens(
        hf, image, PruMergeConfig()
    )


def test_startup_log_states_the_mode_and_the_towers_dtype_with_its_reason(server):
    log = server[1].read_text()
    assert "PruMerge visual-token reduction: mode=prumerge" in log
    # A float32 model: the tower computes in float32 on any machine, and says so.
    assert "PruMerge vision tower: float32 (tower_dtype=auto: the model dtype)" in log


def test_prompt_tokens_are_the_text_plus_each_images_independent_count(
    client, model_name, hf, images
):
    text = _text_tokens(hf, 1)
    configs = [
        PruMergeConfig(mode="prumerge"),
        PruMergeConfig(mode="prumerge+"),
        PruMergeConfig(mode="fixed", budget=40),
        PruMergeConfig(mode="off"),
    ]
    for image in images:
        url = image_data_url(image)
        for config in configs:
            reply = _chat(client, model_name, [url], mode=config.to_dict())
            expected = text + _visual_tokens(hf, image, config)
            assert reply.usage.prompt_tokens == expected, (image.size, config)
        default = _chat(client, model_name, [url]).usage.prompt_tokens  # the server's mode
        assert default == text + _visual_tokens(hf, image, PruMergeConfig()), image.size


def test_two_images_in_one_request_cost_the_sum_of_their_counts(client, model_name, hf, images):
    pair = images[-2:]
    urls = [image_data_url(im) for im in pair]
    for mode in ("prumerge", "prumerge+"):
        config = PruMergeConfig(mode=mode)
        expected = sum(_visual_tokens(hf, im, config) for im in pair)
        reply = _chat(client, model_name, urls, mode=mode)
        assert reply.usage.prompt_tokens == _text_tokens(hf, 2) + expected, mode


@pytest.mark.parametrize(
    "mode, field",
    [
        ("nonsense", "mode"),
        ({"k_neighbors": 0}, "k_neighbors"),
        ({"mode": "fixed"}, "budget"),
        ({"budget_ratio": 2.0, "mode": "fixed"}, "budget_ratio"),
        ({"tower_dtype": "float32"}, "tower_dtype is an engine-level option"),
    ],
    ids=["unknown-mode", "bad-value", "missing-budget", "ratio-above-1", "engine-level-option"],
)
def test_bad_options_get_http_400_naming_the_field(client, model_name, hf, images, mode, field):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        _chat(client, model_name, [image_data_url(images[0])], mode=mode)
    assert exc.value.status_code == 400
    assert field in str(exc.value)
    _assert_still_serving(client, model_name, hf, images[0])


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not-base64-at-all!!",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode(),
    ],
    ids=["corrupt-base64", "undecodable-image"],
)
def test_broken_images_get_http_400(client, model_name, hf, images, url):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        _chat(client, model_name, [url])
    assert exc.value.status_code == 400
    _assert_still_serving(client, model_name, hf, images[0])


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), (255, 0, 0)),
        Image.new("RGB", (8, 900), (0, 90, 200)),
        Image.new("RGB", (336, 336), (127, 127, 127)),
    ],
    ids=["1x1", "8x900", "uniform"],
)
def test_odd_images_are_served_at_their_independent_count(client, model_name, hf, image):
    reply = _chat(client, model_name, [image_data_url(image)])
    count = _visual_tokens(hf, image, PruMergeConfig())
    assert reply.usage.prompt_tokens == _text_tokens(hf, 1) + count


def test_cls_importance_on_a_clip_tower_is_what_the_default_picks(client, model_name, hf, images):
    cls = _chat(client, model_name, [image_data_url(images[0])], mode={"importance": "cls"})
    expected = _visual_tokens(hf, images[0], PruMergeConfig(importance="cls"))
    assert cls.usage.prompt_tokens == _text_tokens(hf, 1) + expected
    default = _chat(client, model_name, [image_data_url(images[0])])  # importance=auto
    assert default.usage.prompt_tokens == cls.usage.prompt_tokens


def test_metrics_count_one_observation_per_image_valued_at_its_whole_count(
    server, client, model_name, hf, scenes
):
    # Images no other test sends: an image served from vLLM's processor cache is not reduced,
    # so not observed, again.
    fresh = [scenes[4].resize((500, 400)), scenes[5].resize((380, 900))]
    modes = ("prumerge", "prumerge+")
    before = fetch_metrics(server[0])
    pair = _chat(client, model_name, [image_data_url(im) for im in fresh])  # the server's mode
    single = _chat(client, model_name, [image_data_url(fresh[0])], mode="prumerge+")
    after = fetch_metrics(server[0])

    def delta(name: str, mode: str) -> float:
        return metric_total(after, name, mode=mode) - metric_total(before, name, mode=mode)

    pair_visual = pair.usage.prompt_tokens - _text_tokens(hf, 2)
    single_visual = single.usage.prompt_tokens - _text_tokens(hf, 1)
    assert pair_visual == sum(_visual_tokens(hf, im, PruMergeConfig()) for im in fresh)
    assert single_visual == _visual_tokens(hf, fresh[0], PruMergeConfig(mode="prumerge+"))
    observed = {
        mode: (delta(METRIC + "_count", mode), delta(METRIC + "_sum", mode)) for mode in modes
    }
    assert observed == {"prumerge": (2, pair_visual), "prumerge+": (1, single_visual)}
    for mode in modes:  # the tower + reduction time of each request's one processor call
        assert delta("vllm_prumerge:reduction_seconds_count", mode) == 1
        assert delta("vllm_prumerge:reduction_seconds_sum", mode) > 0


def test_a_stock_size_image_in_off_mode_is_counted_in_a_finite_bucket(
    server, client, model_name, hf, scenes
):
    image = scenes[7].resize((336, 336))  # no other test sends it: not cached
    count = hf.stock_image_tokens(image)
    before = histogram_buckets(fetch_metrics(server[0]), METRIC, mode="off")
    reply = _chat(client, model_name, [image_data_url(image)], mode="off")
    after = histogram_buckets(fetch_metrics(server[0]), METRIC, mode="off")
    assert reply.usage.prompt_tokens == _text_tokens(hf, 1) + count

    def added(edge: float) -> float:
        return after.get(edge, 0.0) - before.get(edge, 0.0)

    finite = [edge for edge in after if edge != math.inf]
    assert added(math.inf) == 1
    above = [edge for edge in finite if edge >= count]
    assert above, f"{count} visual tokens: above every finite bucket edge (largest {max(finite)})"
    below = [edge for edge in finite if edge < count]
    assert added(min(above)) == 1 and (not below or added(max(below)) == 0), after


def test_a_family_without_video_refuses_a_real_video_with_http_400_and_keeps_serving(
    client, model_name, hf, images, scenes
):
    from openai import BadRequestError

    video = {
        "type": "video_url",
        "video_url": {"url": video_data_url(frames(scenes[:4], (336, 336)))},
    }
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": [video, {"type": "text", "text": QUESTION}]}],
            max_tokens=1,
        )
    assert exc.value.status_code == 400
    # The family refusing videos, not a decoding error of the upload.
    assert "At most 0 video(s)" in str(exc.value)
    _assert_still_serving(client, model_name, hf, images[0])


@pytest.mark.timeout(900)
def test_two_api_servers_serve_exact_counts_and_aggregate_metrics(client, model_name, hf, server):
    """`--api-server-count 2`: every request's count is exact whichever process served it, both
    processes serve, and `/metrics` aggregates the histogram over both (count and sum)."""
    from vllm_prumerge.testing import make_scenes

    modes = ["prumerge", "prumerge+", {"mode": "fixed", "budget": 9}, "off"]
    rounds = 4  # rounds of len(modes) concurrent requests, each image used once
    base_url, log = server
    images = make_scenes(rounds * len(modes), seed=21)
    requests = [(images[i], modes[i % len(modes)]) for i in range(rounds * len(modes))]
    configs = [PruMergeConfig(**({"mode": m} if isinstance(m, str) else m)) for _, m in requests]
    pairs = zip(requests, configs, strict=True)
    expected = [_visual_tokens(hf, image, c) for (image, _), c in pairs]
    before = fetch_metrics(base_url)

    with ThreadPoolExecutor(max_workers=len(modes)) as pool:
        replies = list(pool.map(lambda r: _chat_alone(base_url, model_name, *r), requests))
    assert [r.usage.prompt_tokens - _text_tokens(hf, 1) for r in replies] == expected

    logged = {request: process for process, _, request in REQUEST_LOG.findall(log.read_text())}
    served_by = [
        next(p for r, p in logged.items() if r == reply.id or r.startswith(reply.id + "-"))
        for reply in replies
    ]
    assert len(Counter(served_by)) == 2, f"requests per API-server process: {Counter(served_by)}"

    after = fetch_metrics(base_url)
    for mode in {c.mode for c in configs}:
        counts = [n for n, c in zip(expected, configs, strict=True) if c.mode == mode]
        delta = [
            metric_total(after, METRIC + suffix, mode=mode)
            - metric_total(before, METRIC + suffix, mode=mode)
            for suffix in ("_count", "_sum")
        ]
        assert delta == [len(counts), sum(counts)], mode


# --- Video-LLaVA: `video_url` ------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_hf(video_llava_checkpoint) -> HFPruMergeVideoLlava:
    return HFPruMergeVideoLlava(video_llava_checkpoint)


@pytest.fixture(scope="module")
def video_client(video_server):
    client = _new_client(video_server[0])
    return client, client.models.list().data[0].id


@pytest.fixture(scope="module")
def mp4(scenes) -> bytes:
    """A real four-frame MP4 (lossy: the server's frames are its decoded ones)."""
    return encode_mp4(frames(scenes[:4], (320, 240)))


def _chat_video(video_client, mp4: bytes, mode=None):
    """A chat request with one `video_url` part: the MP4's bytes as a data URL."""
    client, model = video_client
    url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    body = {"mm_processor_kwargs": {"prumerge": mode}} if mode is not None else {}
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=1,
        temperature=0.0,
        extra_body=body,
    )


def _video_text_tokens(video_hf) -> int:
    tokenizer = video_hf.processor.tokenizer
    return chat_text_tokens(tokenizer, video_hf.video_token, QUESTION, 1, "video")


@pytest.mark.parametrize("mode", [None, "prumerge+", "off"])
def test_a_video_url_costs_its_frames_independent_counts_and_one_histogram_observation(
    video_server, video_client, video_hf, mp4, mode
):
    """`usage.prompt_tokens` = the chat text (the checkpoint's template) + the video's tokens, by
    transformers' video tower and the reduction core per decoded frame (`off`: transformers'
    257 per frame, CLS kept); the per-video histogram gains one observation valued at that
    count."""
    config = PruMergeConfig(**({"mode": mode} if mode else {}))
    expected = len(video_hf.video_embeds(decode_mp4(mp4), config))
    before = fetch_metrics(video_server[0])
    reply = _chat_video(video_client, mp4, mode)
    after = fetch_metrics(video_server[0])
    assert reply.usage.prompt_tokens == _video_text_tokens(video_hf) + expected
    delta = [
        metric_total(after, VIDEO_METRIC + suffix, mode=config.mode)
        - metric_total(before, VIDEO_METRIC + suffix, mode=config.mode)
        for suffix in ("_count", "_sum")
    ]
    assert delta == [1, expected]


def test_a_corrupt_or_empty_video_gets_http_400_and_the_server_keeps_serving(
    video_client, video_hf, mp4, scenes
):
    from openai import BadRequestError

    for payload in (b"not an mp4 at all" * 64, b""):
        with pytest.raises(BadRequestError) as exc:
            _chat_video(video_client, payload)
        assert exc.value.status_code == 400
    # Still serving: a video and an image at their exact counts.
    reply = _chat_video(video_client, mp4)
    expected = len(video_hf.video_embeds(decode_mp4(mp4), PruMergeConfig()))
    assert reply.usage.prompt_tokens == _video_text_tokens(video_hf) + expected
    image = scenes[5].resize((500, 400))
    client, model = video_client
    reply = _chat(client, model, [image_data_url(image)])
    text = chat_text_tokens(video_hf.processor.tokenizer, video_hf.image_token, QUESTION, 1)
    assert reply.usage.prompt_tokens == text + len(video_hf.image_embeds(image, PruMergeConfig()))


@pytest.fixture(scope="module")
def cut_mp4(scenes) -> bytes:
    """A real eight-frame MP4 of a scene cut: scene A four times, then scene B four times."""
    return encode_mp4(frames([scenes[1]] * 4 + [scenes[6]] * 4, (320, 240)))


@pytest.mark.parametrize(
    "option",
    [
        {"temporal": "adaptive"},
        {"temporal": "evs", "temporal_rate": 0.75},
        {"mode": "prumerge+", "temporal": "adaptive", "max_tokens": 2},
    ],
    ids=["adaptive", "evs-0.75", "prumerge+-adaptive-max-2"],
)
def test_a_video_url_across_time_costs_its_independent_count(
    video_server, video_client, video_hf, cut_mp4, option
):
    """With the temporal stage (and the ceiling), per request: `usage.prompt_tokens` and the
    per-video histogram as transformers' video tower with vLLM's own EVS function or a plain
    float64 loop for the mask (tests/hf_reference.py), on the decoded frames; fewer tokens than
    each frame reduced alone."""
    config = PruMergeConfig.from_dict(option)
    decoded = decode_mp4(cut_mp4)
    # No decision within float rounding of its boundary: the two towers take the same ones.
    assert retention_margin(video_hf.video_patch_features(decoded), config) > 1e-4
    expected = len(video_hf.video_embeds(decoded, config))
    per_frame = len(video_hf.video_embeds(decoded, PruMergeConfig(mode=config.mode)))
    before = fetch_metrics(video_server[0])
    reply = _chat_video(video_client, cut_mp4, option)
    after = fetch_metrics(video_server[0])
    assert reply.usage.prompt_tokens == _video_text_tokens(video_hf) + expected
    assert expected < per_frame
    delta = [
        metric_total(after, VIDEO_METRIC + suffix, mode=config.mode)
        - metric_total(before, VIDEO_METRIC + suffix, mode=config.mode)
        for suffix in ("_count", "_sum")
    ]
    assert delta == [1, expected]


def test_video_llava_serves_a_1x1_image_at_its_independent_count(video_client, video_hf):
    """Its image processor used to read a (1, 1, 3) image as channels-first and fail (HTTP 400)."""
    image = Image.new("RGB", (1, 1), (255, 0, 0))
    client, model = video_client
    reply = _chat(client, model, [image_data_url(image)])
    text = chat_text_tokens(video_hf.processor.tokenizer, video_hf.image_token, QUESTION, 1)
    assert reply.usage.prompt_tokens == text + len(video_hf.image_embeds(image, PruMergeConfig()))
