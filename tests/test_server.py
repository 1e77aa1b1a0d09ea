"""The exact user command, `vllm serve CKPT --plugin prumerge`, as a subprocess on loopback.

Checked through the OpenAI client: usage.prompt_tokens carries the reduced count, per-request
modes, bad input answered with HTTP 400 while the server keeps serving, /metrics and the
startup log. (KV-cache concurrency is pinned offline from vLLM's per-step stats, in
test_kv_concurrency.py: sampling the server's gauge could miss the peak.)
"""

from __future__ import annotations

import base64
import re
import urllib.request

import pytest
from PIL import Image

from tests.helpers import data_url
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
    "2048",
    "--max-num-seqs",
    "8",
    "--limit-mm-per-prompt",
    '{"image": 2}',
]
QUESTION = "What is shown in this image?"


def _messages(url: str, text: str = QUESTION):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with serve(tiny_llava, SERVER_ARGS, log_path=log) as base_url:
        yield base_url, log


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def hf(tiny_llava):
    return HFPruMergeLlava(tiny_llava)


def _chat(client, model, url, mode=None, max_tokens=4, **extra):
    body = {"mm_processor_kwargs": {"prumerge": mode}} if mode is not None else {}
    return client.chat.completions.create(
        model=model,
        messages=_messages(url),
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={**body, **extra},
    )


def _assert_still_serving(client, model, scenes):
    reply = _chat(client, model, data_url(scenes[0]))
    assert reply.usage.completion_tokens >= 1


def test_startup_log_states_the_mode_and_the_towers_dtype_with_its_reason(server):
    log = server[1].read_text()
    assert "PruMerge visual-token reduction: mode=prumerge" in log
    # A float32 model: the tower computes in float32 on any machine, and says so.
    assert "PruMerge vision tower: float32 (tower_dtype=auto: the model dtype)" in log


def test_usage_prompt_tokens_carry_the_reduced_count(client, model_name, hf, scenes):
    for image in scenes[:3]:
        url = data_url(image)
        stock = _chat(client, model_name, url, mode="off").usage.prompt_tokens
        for config in (
            PruMergeConfig(),
            PruMergeConfig(mode="prumerge+"),
            PruMergeConfig(mode="fixed", budget=40),
        ):
            count = len(hf.image_features(image, config))
            reply = _chat(client, model_name, url, mode=config.to_dict())
            # Same text around the image: the difference is the visual tokens alone.
            assert reply.usage.prompt_tokens == stock - 576 + count, config
    assert _chat(client, model_name, data_url(scenes[3])).usage.prompt_tokens < stock


@pytest.mark.parametrize(
    "mode, field",
    [
        ("nonsense", "mode"),
        ({"k_neighbors": 0}, "k_neighbors"),
        ({"mode": "fixed"}, "budget"),
        ({"budget_ratio": 2.0, "mode": "fixed"}, "budget_ratio"),
        ({"tower_dtype": "float32"}, "tower_dtype is an engine-level option"),
    ],
)
def test_bad_options_get_http_400_naming_the_field(client, model_name, scenes, mode, field):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        _chat(client, model_name, data_url(scenes[1]), mode=mode)
    assert exc.value.status_code == 400
    assert field in str(exc.value)
    _assert_still_serving(client, model_name, scenes)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not-base64-at-all!!",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode(),
    ],
    ids=["corrupt-base64", "undecodable-image"],
)
def test_broken_images_get_http_400(client, model_name, scenes, url):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        _chat(client, model_name, url)
    assert exc.value.status_code == 400
    _assert_still_serving(client, model_name, scenes)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), (255, 0, 0)),
        Image.new("RGB", (8, 900), (0, 90, 200)),
        Image.new("RGB", (336, 336), (127, 127, 127)),
    ],
    ids=["1x1", "8x900", "uniform"],
)
def test_odd_images_are_served(client, model_name, hf, image):
    reply = _chat(client, model_name, data_url(image))
    stock = _chat(client, model_name, data_url(image), mode="off").usage.prompt_tokens
    count = len(hf.image_features(image, PruMergeConfig()))
    assert count >= 2
    assert reply.usage.prompt_tokens == stock - 576 + count


def _metrics(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        return r.read().decode()


def test_metrics_expose_visual_tokens_and_reduction_time(server, client, model_name, scenes):
    _chat(client, model_name, data_url(scenes[5]))
    text = _metrics(server[0])
    count = re.search(r'vllm_prumerge:visual_tokens_per_image_count\{mode="prumerge"\} (\S+)', text)
    assert count and float(count.group(1)) >= 1
    assert 'vllm_prumerge:visual_tokens_per_image_bucket{le="32.0",mode="prumerge"}' in text
    seconds = re.search(r'vllm_prumerge:reduction_seconds_sum\{mode="prumerge"\} (\S+)', text)
    assert seconds and float(seconds.group(1)) > 0
