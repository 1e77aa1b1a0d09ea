"""`vllm serve CKPT --plugin prumerge` on LLaVA-NeXT, SigLIP-LLaVA and LLaVA-OneVision checkpoints.

One server per family (module-scoped), checked through the OpenAI client against independent
figures: the prompt's text tokens come from the checkpoint's own tokenizer and chat template
(transformers), the visual tokens from the independent transformers pipeline of
tests/hf_reference.py (reduced modes: the crops' reduced features, concatenated; LLaVA-NeXT
`off`: transformers' own anyres packing, unpadding and newlines included). Bad input is answered
with HTTP 400 and the server keeps serving; `/metrics` counts one observation per image, valued
at the image's whole count (for LLaVA-NeXT: summed over its crops); OneVision refuses videos with
HTTP 400.
"""

from __future__ import annotations

import base64
import re
import urllib.request

import pytest
from PIL import Image

from tests.helpers import data_url, family_checkpoint
from tests.hf_reference import HFPruMergeLlava
from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.testing.server import serve

pytestmark = pytest.mark.server

SERVER_ARGS = [
    "--plugin",
    "prumerge",
    "--trust-request-mm-kwargs",
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "4096",
    "--max-num-seqs",
    "4",
    "--limit-mm-per-prompt",
    '{"image": 2}',
]
QUESTION = "What is shown in this image?"
METRIC = "vllm_prumerge:visual_tokens_per_image"


@pytest.fixture(scope="module", params=["llava_next", "siglip", "onevision"])
def family(request, tmp_path_factory):
    """(family name, checkpoint path) of a generated checkpoint of that family."""
    return request.param, family_checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    """(base URL, log path) of `vllm serve` on the family's checkpoint; one per family."""
    log = tmp_path_factory.mktemp(f"server-{family[0]}") / "serve.log"
    with serve(family[1], SERVER_ARGS, log_path=log) as base_url:
        yield base_url, log


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def hf(family):
    return HFPruMergeLlava(family[1])


@pytest.fixture(scope="module")
def images(family, scenes):
    """LLaVA-NeXT / OneVision: sizes that give the three grids of the tiny pinpoints (2x2, 1x2,
    2x1) and a small image (upscaled to 1x2). SigLIP (always one 384 px crop): a square and a
    wide image."""
    if family[0] != "siglip":
        sizes = [(700, 700), (672, 336), (300, 700), (200, 150)]
    else:
        sizes = [(336, 336), (700, 300)]
    return [scene.resize(size) for scene, size in zip(scenes, sizes, strict=False)]


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


def _text_tokens(hf: HFPruMergeLlava, num_images: int) -> int:
    """Prompt tokens of the chat request other than the visual tokens, by the checkpoint's own
    chat template and tokenizer: each image is one `<image>` token there, which the server
    expands into the image's visual tokens."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": QUESTION}]
    tokenizer = hf.processor.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(hf.image_token) == num_images
    return len(ids) - num_images


def _visual_tokens(hf: HFPruMergeLlava, image: Image.Image, mode: str) -> int:
    """The independent count: the reduced crops' tokens (transformers tower + core reduction
    per crop), or in `off` the stock count, as transformers' own processor expands `<image>`
    (LLaVA-NeXT: base view + unpadded tiles + one newline per row; SigLIP: 729)."""
    config = PruMergeConfig(mode=mode)
    if config.enabled:
        return len(hf.image_features(image, config))
    ids = hf.processor(images=[image], text="<image>", return_tensors="pt").input_ids[0]
    return int((ids == hf.image_token).sum())


def _assert_still_serving(client, model, image):
    reply = _chat(client, model, [data_url(image)])
    assert reply.usage.completion_tokens == 1


def test_startup_log_states_the_mode(server):
    assert "PruMerge visual-token reduction: mode=prumerge" in server[1].read_text()


def test_prompt_tokens_are_the_text_plus_each_images_independent_count(
    client, model_name, hf, images, family
):
    text = _text_tokens(hf, 1)
    seen = {}
    for image in images:
        url = data_url(image)
        for mode in ("prumerge", "prumerge+", "off"):
            expected = _visual_tokens(hf, image, mode)
            reply = _chat(client, model_name, [url], mode=mode)
            assert reply.usage.prompt_tokens == text + expected, (image.size, mode)
            seen[image.size, mode] = expected
    if family[0] != "siglip":
        # The images cover different grids: each has its own stock cost (base view + unpadded
        # tiles + newlines).
        assert len({seen[im.size, "off"] for im in images}) == len(images)
    else:
        assert {seen[im.size, "off"] for im in images} == {729}


def test_two_images_in_one_request_cost_the_sum_of_their_counts(client, model_name, hf, images):
    pair = images[1:3] if len(images) > 2 else images[:2]
    urls = [data_url(im) for im in pair]
    for mode in ("prumerge", "prumerge+"):
        expected = sum(_visual_tokens(hf, im, mode) for im in pair)
        reply = _chat(client, model_name, urls, mode=mode)
        assert reply.usage.prompt_tokens == _text_tokens(hf, 2) + expected, mode


@pytest.mark.parametrize(
    "mode, field",
    [("nonsense", "mode"), ({"k_neighbors": 0}, "k_neighbors")],
    ids=["unknown-mode", "bad-value"],
)
def test_bad_options_get_http_400_naming_the_field(client, model_name, images, mode, field):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        _chat(client, model_name, [data_url(images[0])], mode=mode)
    assert exc.value.status_code == 400
    assert field in str(exc.value)
    _assert_still_serving(client, model_name, images[0])


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not-base64-at-all!!",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode(),
    ],
    ids=["corrupt-base64", "undecodable-image"],
)
def test_broken_images_get_http_400(client, model_name, images, url):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        _chat(client, model_name, [url])
    assert exc.value.status_code == 400
    _assert_still_serving(client, model_name, images[0])


def test_cls_importance_is_a_400_naming_cls_on_siglip_and_the_default_on_clip(
    client, model_name, hf, images, family
):
    from openai import BadRequestError

    url = data_url(images[0])
    if family[0] != "llava_next":  # SigLIP towers
        with pytest.raises(BadRequestError) as exc:
            _chat(client, model_name, [url], mode={"importance": "cls"})
        assert exc.value.status_code == 400
        assert "CLS" in str(exc.value)
        _assert_still_serving(client, model_name, images[0])
    else:  # CLIP has a CLS token: "cls" is what "auto" picks, so the count is PruMerge's
        reply = _chat(client, model_name, [url], mode={"importance": "cls"})
        expected = _visual_tokens(hf, images[0], "prumerge")
        assert reply.usage.prompt_tokens == _text_tokens(hf, 1) + expected


def _histogram(base_url: str, mode: str) -> tuple[float, float]:
    """(_count, _sum) of the visual-tokens histogram for `mode` (0, 0 before any image)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = []
    for suffix in ("count", "sum"):
        found = re.search(rf'^{METRIC}_{suffix}\{{mode="{re.escape(mode)}"\}} (\S+)$', text, re.M)
        values.append(float(found.group(1)) if found else 0.0)
    return values[0], values[1]


def test_metrics_count_one_observation_per_image_valued_at_its_whole_count(
    server, client, model_name, hf, scenes
):
    # Images no other test sends: an image served from vLLM's processor cache is not reduced,
    # so not observed, again.
    fresh = [scenes[4].resize((500, 400)), scenes[5].resize((380, 900))]
    before = {mode: _histogram(server[0], mode) for mode in ("prumerge", "prumerge+")}
    pair = _chat(client, model_name, [data_url(im) for im in fresh])  # the server's mode
    single = _chat(client, model_name, [data_url(fresh[0])], mode="prumerge+")
    after = {mode: _histogram(server[0], mode) for mode in ("prumerge", "prumerge+")}

    pair_visual = pair.usage.prompt_tokens - _text_tokens(hf, 2)
    single_visual = single.usage.prompt_tokens - _text_tokens(hf, 1)
    assert pair_visual == sum(_visual_tokens(hf, im, "prumerge") for im in fresh)
    assert single_visual == _visual_tokens(hf, fresh[0], "prumerge+")
    count, total = (a - b for a, b in zip(after["prumerge"], before["prumerge"], strict=True))
    assert (count, total) == (2, pair_visual)
    count, total = (a - b for a, b in zip(after["prumerge+"], before["prumerge+"], strict=True))
    assert (count, total) == (1, single_visual)


def test_onevision_videos_are_a_400_and_images_keep_working(client, model_name, images, family):
    if family[0] != "onevision":
        pytest.skip("video inputs exist only on LLaVA-OneVision")
    from openai import BadRequestError

    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": [video, {"type": "text", "text": QUESTION}]}],
            max_tokens=1,
        )
    assert exc.value.status_code == 400
    assert "video" in str(exc.value)
    _assert_still_serving(client, model_name, images[0])
