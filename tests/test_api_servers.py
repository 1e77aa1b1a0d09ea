"""`vllm serve CKPT --plugin prumerge --api-server-count 2`: two API-server processes, one engine.

Each API-server process runs its own multimodal pre-processor, and so its own CLIP tower and
reduction. Pinned here with the real server: every request's `usage.prompt_tokens` carries the
exact reduced count of an independent transformers pipeline whichever process served it, both
processes serve requests (their access-log lines carry their pids), and `/metrics` aggregates
`vllm_prumerge:visual_tokens_per_image` over both processes (count and sum equal the requests').
Which process served a request comes from vLLM's own request log (`--enable-log-requests`: the
process that receives a request logs "Received request <id>", prefixed with its name and pid).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.helpers import assert_served_from_this_clone, chat_text_tokens
from tests.hf_reference import HFPruMergeLlava
from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.testing.media import image_data_url
from vllm_prumerge.testing.prometheus import Samples, metric_total, parse_prometheus
from vllm_prumerge.testing.server import serve

pytestmark = pytest.mark.server

SERVER_ARGS = [
    *["--plugin", "prumerge", "--trust-request-mm-kwargs", "--api-server-count", "2"],
    "--enable-log-requests",
    *["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"],
    *["--max-num-seqs", "8", "--limit-mm-per-prompt", '{"image": 1}'],
]
# Per-request modes, cycled over the images: the same request can land in either process.
MODES = ["prumerge", "prumerge+", {"mode": "fixed", "budget": 9}, "off"]
ROUNDS = 4  # rounds of len(MODES) concurrent requests, each image used once
QUESTION = "What is shown in this image?"
HISTOGRAM = "vllm_prumerge:visual_tokens_per_image"
REQUEST_LOG = re.compile(r"^\((\w+) pid=(\d+)\) INFO .*Received request (\S+?):", re.MULTILINE)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return reply.read().decode()


def _chat(base_url: str, model: str, image: Image.Image, mode) -> dict:
    """One chat request on a new connection (urllib does not keep connections alive)."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": 2,
        "temperature": 0.0,
        "mm_processor_kwargs": {"prumerge": mode},
    }
    request = urllib.request.Request(
        base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())


def _histogram(samples: Samples, mode: str) -> tuple[float, float]:
    """(count, sum) of the visual-tokens histogram for `mode`, over both processes."""
    return (
        metric_total(samples, HISTOGRAM + "_count", mode=mode),
        metric_total(samples, HISTOGRAM + "_sum", mode=mode),
    )


def _expected_count(hf: HFPruMergeLlava, image: Image.Image, config: PruMergeConfig) -> int:
    """Reduced: the transformers pipeline's count; `off`: transformers' processor expansion."""
    return len(hf.image_features(image, config)) if config.enabled else hf.stock_image_tokens(image)


def _config(mode) -> PruMergeConfig:
    return PruMergeConfig(**({"mode": mode} if isinstance(mode, str) else mode))


@pytest.fixture(scope="module")
def served(tiny_llava, tmp_path_factory):
    """The server, and the log file its processes (both API servers included) write to."""
    log = tmp_path_factory.mktemp("api-servers") / "serve.log"
    with serve(tiny_llava, SERVER_ARGS, log_path=log) as base_url:
        assert_served_from_this_clone(log.read_text())
        yield base_url, log


@pytest.mark.timeout(900)
def test_two_api_servers_serve_exact_counts_and_aggregate_metrics(served, tiny_llava):
    from vllm_prumerge.testing import make_scenes

    base_url, log = served
    model = json.loads(_get(base_url + "/v1/models"))["data"][0]["id"]
    hf = HFPruMergeLlava(tiny_llava)
    images = make_scenes(ROUNDS * len(MODES), seed=21)
    before = parse_prometheus(_get(base_url + "/metrics"))

    # The text around the image, in tokens, by the checkpoint's own chat template and tokenizer.
    text_tokens = chat_text_tokens(hf.processor.tokenizer, hf.image_token, QUESTION, 1)
    requests = [(images[i], MODES[i % len(MODES)]) for i in range(ROUNDS * len(MODES))]
    expected = [_expected_count(hf, image, _config(mode)) for image, mode in requests]
    with ThreadPoolExecutor(max_workers=len(MODES)) as pool:
        replies = list(pool.map(lambda r: _chat(base_url, model, *r), requests))

    counts = [reply["usage"]["prompt_tokens"] - text_tokens for reply in replies]
    assert counts == expected
    assert expected[3::4] == [576] * ROUNDS and expected[2::4] == [10] * ROUNDS  # off, fixed 9+1

    log_lines = REQUEST_LOG.findall(log.read_text())
    logged = {request_id: process for process, _, request_id in log_lines}
    served_by = [
        next(p for r, p in logged.items() if r == reply["id"] or r.startswith(reply["id"] + "-"))
        for reply in replies
    ]
    assert len(Counter(served_by)) == 2, f"requests per API-server process: {Counter(served_by)}"

    after = parse_prometheus(_get(base_url + "/metrics"))
    served_modes: dict[str, list[int]] = {}
    for (_, mode), count in zip(requests, counts, strict=True):
        served_modes.setdefault(_config(mode).mode, []).append(count)
    for mode, mode_counts in served_modes.items():
        count_before, sum_before = _histogram(before, mode)
        count_after, sum_after = _histogram(after, mode)
        assert (count_after - count_before, sum_after - sum_before) == (
            len(mode_counts),
            sum(mode_counts),
        ), mode
