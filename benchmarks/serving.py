"""Online serving benchmark: `vllm serve --plugin prumerge` with stock token counts vs PruMerge,
against stock vLLM and against text-only requests of the same length.

The same workload as `throughput.py` (generated scenes or your images, questions of varied
length, fixed output length) is sent to one OpenAI-compatible server through the chat API, one
configuration after another, each request choosing its PruMerge mode with
`extra_body={"mm_processor_kwargs": {"prumerge": ...}}`. Per configuration: TTFT, TPOT, ITL and
end-to-end latency percentiles, request and token throughput, prompt tokens (the server's
`usage`), visual tokens per image (the server's `vllm_prumerge:visual_tokens_per_image`
histogram, read from `/metrics` around each batch) and the peak KV-cache usage / running
requests sampled from `/metrics`, each with its ratio to `off`.

Videos (`--frames N`, on a checkpoint that takes videos): every request sends one N-frame video as
an OpenAI `video_url` part (an MP4 data URL, decoded by the server's own video loader, all N
frames: `--media-io-kwargs '{"video": {"num_frames": N}}'`) instead of the image; visual tokens
are then per video (`vllm_prumerge:visual_tokens_per_video`). A checkpoint whose chat template
drops video parts (the generated ones) is served with `--chat-template-content-format string`,
which puts the `<video>` placeholder before the text.

The configuration `stock` is stock vLLM (no plugin: the tower runs in the engine), served by a
second server this script starts with the same settings, in the same run. Every configuration
is also measured as text only ("text@CONFIG", on by default: each request's chat message without
the image, padded with a filler word to exactly the image request's prompt tokens, checked with
the server's /tokenize; same output length, same server), right after its image requests: `of
text` = image throughput / text throughput, 1.0 = the images cost nothing beyond their tokens.

    python benchmarks/serving.py --out out/serving                      # starts its own server
    python benchmarks/serving.py --tower real --configs stock,off,prumerge --out out/real
    python benchmarks/serving.py --family next_video --frames 8 --out out/serving-video
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --out out/serving

The server this script starts uses the same engine settings as `throughput.py` (prefix caching
and the processor cache off, fixed KV-cache size); a server given with `--base-url` is used as
it is: start it with `--plugin prumerge --trust-request-mm-kwargs` (requests choose their
configuration) and, for comparable figures, `--no-enable-prefix-caching --mm-processor-cache-gb 0`
(`stock` needs a started server).

Writes OUT/serving.json, OUT/serving.md and OUT/serving_latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli import add_model_arguments, add_output_arguments, add_workload_arguments, model_label
from _common import (
    BenchConfig,
    WorkItem,
    build_workload,
    chat_prompt,
    default_configs,
    modality,
    parse_configs,
    summary,
    synthetic_checkpoint,
)
from _report import (
    device_line,
    device_name,
    environment,
    finish,
    markdown_table,
    media_labels,
    progress,
    pyplot,
    save_figure,
    token_ticks,
    video_note,
)

from vllm_prumerge.testing.media import image_data_url, video_data_url
from vllm_prumerge.testing.prometheus import metric_max, metric_total, parse_prometheus
from vllm_prumerge.testing.prompts import chat_messages

VISUAL_METRIC = "vllm_prumerge:visual_tokens_per_image"
VIDEO_METRIC = "vllm_prumerge:visual_tokens_per_video"
TOWER_METRIC = "vllm_prumerge:reduction_seconds"  # tower + reduction, per processed batch
KV_METRIC = "vllm:kv_cache_usage_perc"
RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"
STOCK = "stock"


def is_stock(name: str) -> bool:
    """`stock` (stock vLLM at --dtype) or `stock:DTYPE` (stock vLLM at that --dtype)."""
    return name == STOCK or name.startswith(STOCK + ":")


# The server's part of the report's line on video requests (`_report.video_note`).
SERVER_VIDEO_NOTE = (
    "Sent as an MP4 `video_url`, counted by `vllm_prumerge:visual_tokens_per_video`; tower ms "
    "per video."
)
FILLER = " the"  # one text token per repetition in LLaVA's tokenizers; checked with /tokenize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " TTFT, TPOT, ITL, end-to-end latency and throughput per configuration; JSON, "
        "Markdown and PNG output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    srv = parser.add_argument_group("server")
    srv.add_argument(
        "--base-url",
        default=None,
        help="Use this running server (e.g. http://127.0.0.1:8000, started with `vllm serve "
        "MODEL --plugin prumerge`) instead of starting one.",
    )
    srv.add_argument(
        "--model",
        default=None,
        help="Checkpoint the started server serves (hub id such as llava-hf/llava-1.5-7b-hf or "
        "a folder; LLaVA-1.5, LLaVA-NeXT, SigLIP-LLaVA, LLaVA-OneVision or LLaVA-NeXT-Video). "
        "Default: a "
        "generated random-weight checkpoint (see --synthetic, --family, --tower). With "
        "--base-url: the served model name (default: the server's first).",
    )
    add_model_arguments(srv)
    srv.add_argument("--dtype", default="auto", help="--dtype of the started server.")
    srv.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=8192,
        help="KV-cache capacity of the started server in tokens (--num-gpu-blocks-override = "
        "this / --block-size); 0 = sized by vLLM from memory.",
    )
    srv.add_argument("--block-size", type=int, default=32, help="KV-cache block size (tokens).")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="Server's --max-num-seqs.")
    srv.add_argument("--max-model-len", type=int, default=2048, help="Server's --max-model-len.")
    srv.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Server's --enforce-eager (default: on without a GPU, off with one).",
    )
    srv.add_argument(
        "--tower-threads",
        type=int,
        default=None,
        help="Torch threads of the plugin's vision tower in the started server (sets "
        "VLLM_PRUMERGE_TOWER_THREADS, which overrides --prumerge-tower-threads). Default: the "
        "server's own setting (--prumerge-tower-threads auto: the cores the server may run on "
        "divided by --api-server-count).",
    )
    srv.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        help="--api-server-count of the started servers: API-server processes, each with its "
        "own pre-processor (and, with the plugin, its own tower).",
    )
    srv.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="Extra argument for the started `vllm serve` (repeatable; use the = form for "
        "values, e.g. --server-arg=--gpu-memory-utilization=0.8).",
    )
    srv.add_argument(
        "--server-timeout",
        type=float,
        default=900,
        help="Seconds to wait for the started server to answer /health.",
    )
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--configs",
        default=None,
        help="Comma-separated configurations, as in throughput.py: off, prumerge, prumerge+, "
        "fixed:N, fixed:Ns, fixed:RATIO, and stock (stock vLLM, no plugin, in a second server "
        "started by this script; stock:DTYPE: one more stock server at that --dtype, e.g. "
        "stock:float32). Ratios are taken to 'off' (or to the configuration with the "
        f"most prompt tokens when 'off' is absent). Default: {default_configs(0)}; with "
        f"--frames: {default_configs(1)} (budgets per frame).",
    )
    work.add_argument(
        "--text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure every configuration's text-equivalent (text@CONFIG: the same chat "
        "messages without the image, padded to exactly the image request's prompt tokens), "
        "the limit an image request can reach on this server.",
    )
    add_workload_arguments(work, "Seed of images, questions, arrivals.")
    work.add_argument(
        "--request-rate",
        default="inf",
        help="Request arrival rate(s) in requests/s (Poisson arrivals, seeded); 'inf' sends "
        "all at once (then --max-concurrency alone limits). A comma-separated list runs a "
        "sweep: every configuration at every rate.",
    )
    work.add_argument(
        "--max-concurrency",
        type=int,
        default=8,
        help="Most requests in flight from the client at once (0 = unlimited).",
    )
    work.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="Warm-up requests per configuration (other images), run and discarded right before "
        "its measured requests; a first round of 2 requests per configuration precedes all.",
    )
    work.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="Measure every configuration this many times (order rotated each round); "
        "percentiles are over all repeats' requests, throughput over their total time.",
    )
    work.add_argument(
        "--metrics-interval",
        type=float,
        default=0.25,
        help="Seconds between /metrics samples for peak KV-cache usage and running requests.",
    )
    add_output_arguments(
        parser,
        "out/serving",
        "Folder for serving.json, serving.md, serving_latency.png (and server.log).",
        plots="PNG plot",
    )
    return parser


# --------------------------------------------------------------------------------------------
# Server


def server_args(
    args: argparse.Namespace, *, stock: bool = False, dtype: str | None = None
) -> list[str]:
    """`vllm serve` arguments: the plugin (not for `stock`) and the engine settings of
    throughput.py."""
    plugin = [] if stock else ["--plugin", "prumerge", "--trust-request-mm-kwargs"]
    result = [
        *plugin,  # --trust-request-mm-kwargs lets each request choose its configuration
        "--dtype",
        dtype or args.dtype,
        "--seed",
        str(args.seed),
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--block-size",
        str(args.block_size),
        "--limit-mm-per-prompt",
        json.dumps({modality(args.frames): 1}),
        "--no-enable-prefix-caching",
        "--mm-processor-cache-gb",
        "0",
        "--api-server-count",
        str(args.api_server_count),
    ]
    if args.kv_cache_tokens:
        result += [
            "--num-gpu-blocks-override",
            str(max(1, args.kv_cache_tokens // args.block_size)),
        ]
    if args.frames:  # every frame of the clip, as sent (vLLM's loader samples 32 by default)
        result += ["--media-io-kwargs", json.dumps({"video": {"num_frames": args.frames}})]
        if args.chat_content_format != "openai":  # the template drops video parts
            result += ["--chat-template-content-format", args.chat_content_format]
    if args.enforce_eager:
        result.append("--enforce-eager")
    return result + list(args.server_arg)


# --------------------------------------------------------------------------------------------
# Client


def text_messages(question: str, fillers: int) -> list[dict[str, Any]]:
    """The text-only chat message: `fillers` filler words in place of the image, then the
    question."""
    return [{"role": "user", "content": [{"type": "text", "text": FILLER * fillers + question}]}]


@dataclasses.dataclass(frozen=True)
class Request:
    """One chat request of a batch: its messages and the PruMerge option (None: no plugin
    kwargs, for stock vLLM and text-only requests)."""

    messages: list[dict[str, Any]]
    prumerge: str | dict[str, Any] | None


async def one_request(client: Any, model: str, request: Request, output_len: int) -> dict[str, Any]:
    """One streamed chat completion; timings as `vllm bench serve` (openai-chat) takes them:
    TTFT at the first chunk with choices, ITL between later chunks, latency at the last."""
    extra_body: dict[str, Any] = {"ignore_eos": True}
    if request.prumerge is not None:
        extra_body["mm_processor_kwargs"] = {"prumerge": request.prumerge}
    result: dict[str, Any] = {"ok": False, "ttft": None, "itl": [], "latency": None}
    start = time.perf_counter()
    last = start
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=request.messages,
            max_completion_tokens=output_len,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra_body,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if result["ttft"] is None:
                    result["ttft"] = now - start
                else:
                    result["itl"].append(now - last)
                last = now
            if chunk.usage is not None:
                result["prompt_tokens"] = chunk.usage.prompt_tokens
                result["output_tokens"] = chunk.usage.completion_tokens
        result["latency"] = last - start
        result["ok"] = result["ttft"] is not None and "output_tokens" in result
    except Exception as exc:  # recorded per request, the run goes on
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    result["start"] = start
    result["end"] = time.perf_counter()
    return result


async def sample_metrics(http: Any, base_url: str, interval: float, peaks: dict) -> None:
    """Poll /metrics until cancelled; keep the peaks of KV usage, running and waiting."""
    while True:
        with contextlib.suppress(Exception):
            response = await http.get(base_url + "/metrics")
            samples = parse_prometheus(response.text)
            for key, name in (
                ("peak_kv_cache_usage", KV_METRIC),
                ("max_running_requests", RUNNING_METRIC),
                ("max_waiting_requests", WAITING_METRIC),
            ):
                value = metric_max(samples, name)
                if value is not None:
                    peaks[key] = max(peaks.get(key, 0.0), value)
            peaks["samples"] = peaks.get("samples", 0) + 1
        await asyncio.sleep(interval)


def media_url(item: WorkItem) -> str:
    """The data URL of what the request sends: a PNG image, or an MP4 of the video's frames."""
    return image_data_url(item.image) if item.video is None else video_data_url(item.video)


def image_requests(items: list[WorkItem], urls: list[str], config: BenchConfig) -> list[Request]:
    """The chat requests of `items` (an `image_url` or a `video_url` part each, then the
    question) in `config`."""
    option = None if is_stock(config.name) else config.prumerge
    return [
        Request(
            chat_messages(item.question, [url])
            if item.video is None
            else chat_messages(item.question, video_urls=[url]),
            option,
        )
        for item, url in zip(items, urls, strict=True)
    ]


async def run_batch(
    client: Any,
    model: str,
    requests: list[Request],
    args: argparse.Namespace,
    rate: float,
    bar: Any,
) -> tuple[list[dict[str, Any]], float]:
    """Send `requests` with Poisson arrivals at `rate` (inf: all at once), at most
    `--max-concurrency` in flight; returns (results in order, seconds first send -> last end)."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency > 0 else None
    rng = random.Random(args.seed)

    async def guarded(request: Request) -> dict[str, Any]:
        if limit is None:
            result = await one_request(client, model, request, args.output_len)
        else:
            async with limit:
                result = await one_request(client, model, request, args.output_len)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for i, request in enumerate(requests):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(guarded(request)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def read_metrics(http: Any, base_url: str) -> dict[str, Any]:
    """The server's /metrics, parsed (the async client's counterpart of `fetch_metrics`)."""
    response = await http.get(base_url + "/metrics")
    response.raise_for_status()
    return parse_prometheus(response.text)


async def measure_batch(
    client: Any,
    http: Any,
    base_url: str,
    model: str,
    requests: list[Request],
    mode: str | None,
    args: argparse.Namespace,
    rate: float,
    bar: Any,
) -> dict[str, Any]:
    """One measured batch: per-request results, its duration, the server's visual-token
    histogram change for `mode` (None: not read), and the /metrics peaks sampled meanwhile."""
    before = await read_metrics(http, base_url)
    peaks: dict[str, Any] = {}
    sampler = asyncio.create_task(sample_metrics(http, base_url, args.metrics_interval, peaks))
    try:
        results, seconds = await run_batch(client, model, requests, args, rate, bar)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    after = await read_metrics(http, base_url)
    visual = {"sum": 0.0, "count": 0.0}
    metric = VIDEO_METRIC if args.frames else VISUAL_METRIC
    for suffix in ("sum", "count") if mode is not None else ():
        name = f"{metric}_{suffix}"
        visual[suffix] = metric_total(after, name, mode=mode) - metric_total(
            before, name, mode=mode
        )
    visual["mean"] = visual["sum"] / visual["count"] if visual["count"] else math.nan
    tower_name = f"{TOWER_METRIC}_sum"
    tower_seconds = (
        metric_total(after, tower_name, mode=mode) - metric_total(before, tower_name, mode=mode)
        if mode is not None
        else 0.0
    )
    return {
        "results": results,
        "seconds": seconds,
        "visual": visual,
        "tower_seconds": tower_seconds,
        "peaks": peaks,
    }


def figures(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one configuration pooled over its repeats: percentiles over every request,
    throughput = completed requests / total measured seconds, peaks = max over repeats."""
    results = [r for batch in batches for r in batch["results"]]
    seconds = sum(batch["seconds"] for batch in batches)
    ok = [r for r in results if r["ok"]]
    tpot = [
        (r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1
    ]
    itl = [x for r in ok for x in r["itl"]]
    prompt = [r["prompt_tokens"] for r in ok]
    output = [r["output_tokens"] for r in ok]
    visual_sum = sum(batch["visual"]["sum"] for batch in batches)
    visual_count = sum(batch["visual"]["count"] for batch in batches)
    tower_seconds = sum(batch.get("tower_seconds", 0.0) for batch in batches)
    peaks: dict[str, float] = {}
    for batch in batches:
        for key, value in batch["peaks"].items():
            combine = sum if key == "samples" else max
            peaks[key] = combine((value, peaks.get(key, 0)))
    # Too few samples (batches shorter than a few intervals) would read as zero: omitted.
    sampled = peaks.get("samples", 0) >= 3 * len(batches)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:5],
        "repeats": len(batches),
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds,
        "requests_per_s_per_repeat": [
            sum(r["ok"] for r in batch["results"]) / batch["seconds"] for batch in batches
        ],
        "output_tokens_per_s": sum(output) / seconds,
        "total_tokens_per_s": (sum(prompt) + sum(output)) / seconds,
        "prompt_tokens": summary(prompt),
        "output_tokens": summary(output),
        "visual_tokens_mean": visual_sum / visual_count if visual_count else math.nan,
        "visual_images": visual_count,
        # The plugin's front end in the server: tower + reduction wall seconds per image, and
        # their sum over the measured time (>= 1 per API server: the front end never idled).
        "tower_ms_per_image": 1e3 * tower_seconds / visual_count if visual_count else math.nan,
        "tower_busy": tower_seconds / seconds,
        "ttft_ms": {k: 1e3 * v for k, v in summary([r["ttft"] for r in ok]).items()},
        "tpot_ms": {k: 1e3 * v for k, v in summary(tpot).items()},
        "itl_ms": {k: 1e3 * v for k, v in summary(itl).items()},
        "e2el_ms": {k: 1e3 * v for k, v in summary([r["latency"] for r in ok]).items()},
        "peak_kv_cache_usage_sampled": peaks.get("peak_kv_cache_usage") if sampled else None,
        "max_running_requests_sampled": peaks.get("max_running_requests") if sampled else None,
        "max_waiting_requests_sampled": peaks.get("max_waiting_requests") if sampled else None,
        "metrics_samples": peaks.get("samples", 0),
    }


class TextPadder:
    """Text-only chat messages with exactly a given number of prompt tokens: the question after
    filler words, their count found with the server's own /tokenize (cached)."""

    def __init__(self, http: Any, base_url: str, model: str) -> None:
        self.http = http
        self.base_url = base_url
        self.model = model
        self.found: dict[tuple[str, int], tuple[list[dict[str, Any]], int]] = {}

    async def count(self, messages: list[dict[str, Any]]) -> int:
        response = await self.http.post(
            self.base_url + "/tokenize",
            json={"model": self.model, "messages": messages, "add_generation_prompt": True},
        )
        response.raise_for_status()
        return int(response.json()["count"])

    async def messages(self, question: str, target: int) -> tuple[list[dict[str, Any]], int]:
        """(messages, their prompt tokens): `target` unless no filler count reaches it."""
        key = (question, target)
        if key not in self.found:
            fillers = max(0, target - await self.count(text_messages(question, 0)))
            tokens = await self.count(text_messages(question, fillers))
            for _ in range(4):
                if tokens == target:
                    break
                fillers = max(0, fillers + target - tokens)
                tokens = await self.count(text_messages(question, fillers))
            self.found[key] = (text_messages(question, fillers), tokens)
        return self.found[key]


async def text_requests(
    padder: TextPadder, items: list[WorkItem], batch: dict[str, Any]
) -> tuple[list[Request], list[int]]:
    """The text-equivalents of a measured image batch: per completed request, its question
    padded to the prompt tokens the server reported for it; (requests, their target lengths)."""
    requests, targets = [], []
    for item, result in zip(items, batch["results"], strict=True):
        if result["ok"]:
            messages, _ = await padder.messages(item.question, result["prompt_tokens"])
            requests.append(Request(messages, None))
            targets.append(result["prompt_tokens"])
    return requests, targets


async def benchmark(
    base_url: str, args: argparse.Namespace, configs: list[BenchConfig]
) -> dict[str, Any]:
    """Every configuration of `configs` (all served by the server at `base_url`), with its
    text-equivalent when --text; returns the served model name and one run per (rate, config)."""
    import httpx
    from openai import AsyncOpenAI

    rates = [float(r) for r in args.request_rate.split(",") if r.strip()]
    size = tuple(args.image_size)
    items = build_workload(args.num_prompts, args.seed, args.images, size=size, frames=args.frames)
    warm = build_workload(
        args.warmup * len(configs) * len(rates) * args.repeats + 2,
        args.seed,
        args.images,
        start=args.num_prompts,
        size=size,
        frames=args.frames,
    )
    urls = [media_url(item) for item in items]
    warm_urls = [media_url(item) for item in warm]
    warm_index = 0
    limits = httpx.Limits(max_connections=max(64, args.max_concurrency * 2))
    client = AsyncOpenAI(
        base_url=base_url + "/v1",
        api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        timeout=httpx.Timeout(3600.0),
        http_client=httpx.AsyncClient(limits=limits, timeout=3600.0),
        max_retries=0,
    )
    http = httpx.AsyncClient(timeout=30.0)
    model = args.model if args.base_url and args.model else (await client.models.list()).data[0].id
    padder = TextPadder(http, base_url, model)
    silent = progress(0, "", disable=True)
    # A first round of every configuration: loads the tower in the server's front end and
    # touches every code path before anything is measured.
    for config in configs:
        await run_batch(
            client, model, image_requests(warm[:2], warm_urls[:2], config), args, math.inf, silent
        )
    warm_index = 2
    pooled: dict[tuple[float, str], list[dict[str, Any]]] = {}
    pooled_text: dict[tuple[float, str], list[dict[str, Any]]] = {}
    text_targets: dict[tuple[float, str], list[int]] = {}
    per_config = args.num_prompts * (2 if args.text else 1)
    total = len(configs) * len(rates) * per_config * args.repeats
    with progress(total, "serving", disable=args.no_progress) as bar:
        for repeat in range(args.repeats):
            shift = repeat % len(configs)
            for rate in rates:
                for config in configs[shift:] + configs[:shift]:
                    if args.warmup:
                        bar.set_description(f"{config.name} @ {rate:g} req/s (warm-up)")
                        chosen = slice(warm_index, warm_index + args.warmup)
                        warm_index += args.warmup
                        await run_batch(
                            client,
                            model,
                            image_requests(warm[chosen], warm_urls[chosen], config),
                            args,
                            rate,
                            silent,
                        )
                    bar.set_description(f"{config.name} @ {rate:g} req/s")
                    measured = await measure_batch(
                        client,
                        http,
                        base_url,
                        model,
                        image_requests(items, urls, config),
                        None if is_stock(config.name) else config.mode,
                        args,
                        rate,
                        bar,
                    )
                    pooled.setdefault((rate, config.name), []).append(measured)
                    ok = sum(r["ok"] for r in measured["results"])
                    if not ok:
                        errors = sorted({r.get("error", "") for r in measured["results"]})[:3]
                        hint = (
                            " (start the server with --trust-request-mm-kwargs)"
                            if "trust-request-mm-kwargs" in str(errors)
                            else ""
                        )
                        raise RuntimeError(f"every request of {config.name} failed{hint}: {errors}")
                    bar.set_postfix_str(
                        f"{config.name}: {ok / measured['seconds']:.2f} req/s, "
                        f"{measured['visual']['mean']:.1f} visual tok/"
                        + media_labels(vars(args))[0]
                    )
                    if args.text:
                        bar.set_description(f"text@{config.name} @ {rate:g} req/s")
                        requests, targets = await text_requests(padder, items, measured)
                        text = await measure_batch(
                            client, http, base_url, model, requests, None, args, rate, bar
                        )
                        pooled_text.setdefault((rate, config.name), []).append(text)
                        text_targets.setdefault((rate, config.name), []).extend(targets)
    runs = []
    for rate in rates:
        for config in configs:
            run = {
                "name": config.name,
                "prumerge": None if is_stock(config.name) else config.prumerge,
                "request_rate": rate,
                **figures(pooled[(rate, config.name)]),
            }
            if args.text:
                text = figures(pooled_text[(rate, config.name)])
                targets = text_targets[(rate, config.name)]
                text["target_prompt_tokens"] = summary(targets)
                run["text"] = text
            runs.append(run)
    await client.close()
    await http.aclose()
    return {"served_model": model, "runs": runs}


def fill_stock_visual_tokens(runs: list[dict[str, Any]]) -> None:
    """Visual tokens of `stock` runs (no plugin histogram): its prompt tokens minus the text
    tokens of the same requests, known from a plugin run at the same rate (prompt - visual)."""
    for r in runs:
        if not is_stock(r["name"]):
            continue
        known = [
            o
            for o in runs
            if not is_stock(o["name"])
            and o["request_rate"] == r["request_rate"]
            and not math.isnan(o["visual_tokens_mean"])
        ]
        if known:
            text = known[0]["prompt_tokens"]["mean"] - known[0]["visual_tokens_mean"]
            r["visual_tokens_mean"] = r["prompt_tokens"]["mean"] - text
            r["visual_tokens_source"] = f"prompt tokens - text tokens of {known[0]['name']}"


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Per request rate: ratios to `off` (or the run with the most prompt tokens)."""
    for rate in sorted({r["request_rate"] for r in runs}):
        group = [r for r in runs if r["request_rate"] == rate]
        base = next(
            (r for r in group if r["name"] == "off"),
            max(group, key=lambda r: r["prompt_tokens"]["mean"]),
        )
        for r in group:
            r["baseline"] = base["name"]
            r["ideal_speedup"] = base["prompt_tokens"]["mean"] / r["prompt_tokens"]["mean"]
            r["ratio_to_baseline"] = {
                "requests_per_s": r["requests_per_s"] / base["requests_per_s"],
                "output_tokens_per_s": r["output_tokens_per_s"] / base["output_tokens_per_s"],
                "ttft_p50": r["ttft_ms"]["p50"] / base["ttft_ms"]["p50"],
                "ttft_mean": r["ttft_ms"]["mean"] / base["ttft_ms"]["mean"],
                "tpot_p50": r["tpot_ms"]["p50"] / base["tpot_ms"]["p50"],
                "e2el_p50": r["e2el_ms"]["p50"] / base["e2el_ms"]["p50"],
                "prompt_tokens": r["prompt_tokens"]["mean"] / base["prompt_tokens"]["mean"],
            }
            stock = next((o for o in group if o["name"] == STOCK), None)
            if stock is not None:
                r["ratio_to_stock"] = {
                    "requests_per_s": r["requests_per_s"] / stock["requests_per_s"],
                    "ttft_p50": r["ttft_ms"]["p50"] / stock["ttft_ms"]["p50"],
                }
            if "text" in r:
                r["fraction_of_text"] = {
                    "requests_per_s": r["requests_per_s"] / r["text"]["requests_per_s"],
                    "ttft_p50": r["ttft_ms"]["p50"] / r["text"]["ttft_ms"]["p50"],
                }


# --------------------------------------------------------------------------------------------
# Reports


def markdown_report(data: dict[str, Any]) -> str:
    env = data["environment"]
    settings = data["settings"]
    short, long = media_labels(settings)
    lines = [
        f"# Serving: visual tokens per {long} vs latency and throughput (vllm serve)",
        "",
        *video_note(settings, SERVER_VIDEO_NOTE),
        f"Model: `{data['model']}`; server: {data['server']}; {settings['num_prompts']} "
        f"requests per configuration and repeat ({settings['repeats']} repeats, pooled), "
        f"{settings['output_len']} output tokens each, max concurrency "
        f"{settings['max_concurrency'] or 'unlimited'}; {device_line(env)}.",
        "",
        "Latencies in ms (p50 / p99). `x` = ratio to the baseline (`off`) at the same request "
        "rate; `prompt-ratio ideal x` = prompt-token ratio (the speed-up if cost were "
        "proportional to prompt tokens; no engine reaches it, decode steps do not shrink). "
        "Visual tokens: the server's own histogram (`stock`: prompt tokens minus the requests' "
        "text tokens); peak KV and running: sampled from /metrics.",
        "",
        *text_section(data),
        "## All figures",
        "",
        markdown_table(
            [
                "config",
                "rate",
                f"visual tok/{short}",
                "prompt tok",
                "req/s",
                "x",
                "prompt-ratio ideal x",
                "out tok/s",
                "TTFT p50",
                "TTFT p99",
                "TTFT x",
                "TPOT p50",
                "TPOT p99",
                "ITL p50",
                "E2E p50",
                "E2E p99",
                "E2E x",
                "peak KV %",
                "max running",
                "failed",
            ],
            [
                [
                    r["name"],
                    r["request_rate"],
                    r["visual_tokens_mean"],
                    r["prompt_tokens"]["mean"],
                    r["requests_per_s"],
                    r["ratio_to_baseline"]["requests_per_s"],
                    r["ideal_speedup"],
                    r["output_tokens_per_s"],
                    r["ttft_ms"]["p50"],
                    r["ttft_ms"]["p99"],
                    r["ratio_to_baseline"]["ttft_p50"],
                    r["tpot_ms"]["p50"],
                    r["tpot_ms"]["p99"],
                    r["itl_ms"]["p50"],
                    r["e2el_ms"]["p50"],
                    r["e2el_ms"]["p99"],
                    r["ratio_to_baseline"]["e2el_p50"],
                    None
                    if r["peak_kv_cache_usage_sampled"] is None
                    else 100 * r["peak_kv_cache_usage_sampled"],
                    r["max_running_requests_sampled"],
                    r["failed"],
                ]
                for r in data["runs"]
            ],
        ),
        "Method: " + data["method"],
        "",
    ]
    return "\n".join(lines)


def text_section(data: dict[str, Any]) -> list[str]:
    """The "true limit" table: each configuration against its text-equivalent (and stock)."""
    runs = [r for r in data["runs"] if "text" in r]
    if not runs:
        return []
    short, long = media_labels(data["settings"])
    has_stock = any("ratio_to_stock" in r for r in runs)
    header = [
        "config",
        "rate",
        f"visual tok/{short}",
        "prompt tok",
        "text prompt tok",
        "req/s",
        "text-equiv. req/s",
        "of text",
        "x off",
        *(["x stock"] if has_stock else []),
        "TTFT p50",
        "text TTFT p50",
        "E2E p50",
        "text E2E p50",
        f"tower ms/{short}",
        "tower busy",
    ]
    rows = [
        [
            r["name"],
            r["request_rate"],
            r["visual_tokens_mean"],
            r["prompt_tokens"]["mean"],
            r["text"]["prompt_tokens"]["mean"],
            r["requests_per_s"],
            r["text"]["requests_per_s"],
            r["fraction_of_text"]["requests_per_s"],
            r["ratio_to_baseline"]["requests_per_s"],
            *([r.get("ratio_to_stock", {}).get("requests_per_s")] if has_stock else []),
            r["ttft_ms"]["p50"],
            r["text"]["ttft_ms"]["p50"],
            r["e2el_ms"]["p50"],
            r["text"]["e2el_ms"]["p50"],
            r["tower_ms_per_image"],
            r["tower_busy"] if not is_stock(r["name"]) else None,
        ]
        for r in runs
    ]
    return [
        "## Against the true limit (text-equivalent requests)",
        "",
        f"`text@CONFIG`: each completed request's chat message without the {long}, padded "
        f"with a filler word to the prompt tokens the server reported for the {long} request "
        "(`text prompt tok` shows the match), same output length, same server, measured right "
        f"after the {long} requests. `of text` = {long} req/s / text req/s: 1.0 = the "
        f"{long}s cost nothing beyond their tokens. `x stock` = ratio to stock vLLM's req/s "
        f"for the same {long}s. `tower ms/{short}` = the plugin's tower + reduction wall time "
        f"per {long} in the server during the batch (its `vllm_prumerge:reduction_seconds`), "
        "`tower busy` = that time summed over the batch / the batch's duration: near 1 per "
        "API-server process, the front end was busy the whole time (the bottleneck).",
        "",
        markdown_table(header, rows),
    ]


def plot(data: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    rates = sorted({r["request_rate"] for r in data["runs"]})
    for i, rate in enumerate(rates):
        group = [r for r in data["runs"] if r["request_rate"] == rate]
        xs = [r["visual_tokens_mean"] for r in group]
        tag = f"rate {rate:g}"
        for ax, key, title in (
            (axes[0], "ttft_ms", "TTFT (ms)"),
            (axes[1], "e2el_ms", "end-to-end latency (ms)"),
        ):
            ax.scatter(xs, [r[key]["p50"] for r in group], color=f"C{i}", label=f"p50, {tag}")
            ax.scatter(
                xs, [r[key]["p99"] for r in group], color=f"C{i}", marker="^", label=f"p99, {tag}"
            )
            ax.set_title(title)
        axes[2].scatter(xs, [r["requests_per_s"] for r in group], color=f"C{i}", label=tag)
        texts = [r for r in group if "text" in r and not math.isnan(r["visual_tokens_mean"])]
        if texts:
            axes[2].scatter(
                [r["visual_tokens_mean"] for r in texts],
                [r["text"]["requests_per_s"] for r in texts],
                facecolors="none",
                edgecolors=f"C{i}",
                marker="s",
                label=f"text-equivalent, {tag}",
            )
        axes[2].set_title("requests / s")
        for r in group:
            axes[2].annotate(
                r["name"],
                (r["visual_tokens_mean"], r["requests_per_s"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    largest = max(
        (r["visual_tokens_mean"] for r in data["runs"] if not math.isnan(r["visual_tokens_mean"])),
        default=576,
    )
    ticks = token_ticks(largest)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(f"visual tokens per {media_labels(data['settings'])[1]} (mean, log scale)")
        ax.legend(fontsize=7)
    env = data["environment"]
    fig.suptitle(
        f"{data['model']}: {data['settings']['num_prompts']} requests, max concurrency "
        f"{data['settings']['max_concurrency']}; {device_name(env)}",
        fontsize=9,
    )
    return [save_figure(fig, out, "serving_latency.png")]


# --------------------------------------------------------------------------------------------


METHOD = (
    "One server, one configuration after another (per-request mm_processor_kwargs through "
    "extra_body); streamed chat completions with ignore_eos and a fixed max_completion_tokens; "
    "TTFT = first streamed chunk with choices (vLLM sends the first one with the first token), "
    "TPOT = (latency - TTFT) / (output tokens - 1), ITL = gaps between later chunks, as "
    "`vllm bench serve` takes them. A first round of every configuration (2 requests each) "
    "precedes all measurements, and each configuration is preceded by --warmup requests on "
    "other images. Prompt tokens are the server's usage.prompt_tokens; visual tokens the "
    "change of the server's vllm_prumerge:visual_tokens_per_image histogram (sum / count) over "
    "the measured requests; peak KV-cache usage and running requests are the maxima of "
    "vllm:kv_cache_usage_perc and vllm:num_requests_running sampled from /metrics. "
    "Text-equivalents (text@CONFIG) follow each measured batch: the same questions as text-only "
    "chat messages padded with a filler word to the image request's usage.prompt_tokens (the "
    "filler count found with the server's /tokenize), no mm_processor_kwargs. `stock` runs on "
    "a second server (stock vLLM: no --plugin) with the same settings, before the plugin's."
)


def start_and_measure(
    args: argparse.Namespace,
    model: str,
    configs: list[BenchConfig],
    *,
    stock: bool,
    out: Path,
    dtype: str | None = None,
) -> tuple[dict[str, Any], str, float]:
    """Start `vllm serve` (stock vLLM, or with the plugin), measure `configs` on it, stop it;
    (benchmark data, the server command, start-up seconds)."""
    import torch

    from vllm_prumerge.encoder import PruMergeEncoder
    from vllm_prumerge.testing.server import serve

    server_env: dict[str, str] = {}
    if not torch.cuda.is_available():
        server_env["VLLM_TARGET_DEVICE"] = "cpu"
        server_env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tower_threads and not stock:
        server_env[PruMergeEncoder.THREADS_ENV] = str(args.tower_threads)
    cli = server_args(args, stock=stock, dtype=dtype)
    t0 = time.perf_counter()
    log = out / ((f"server-stock-{dtype}" if dtype else "server-stock") if stock else "server")
    log = log.with_suffix(".log")
    with serve(model, cli, env=server_env, timeout=args.server_timeout, log_path=log) as base:
        started = time.perf_counter() - t0
        data = asyncio.run(benchmark(base, args, configs))
    prefix = " ".join(f"{k}={v}" for k, v in server_env.items() if k.startswith("VLLM_PRUMERGE"))
    command = f"`{prefix + ' ' if prefix else ''}vllm serve MODEL {' '.join(cli)}`"
    return data, command, started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.output_len < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--num-prompts, --output-len and --repeats must be >= 1, --warmup >= 0")
    if args.api_server_count < 1 or (args.tower_threads is not None and args.tower_threads < 1):
        raise SystemExit("--api-server-count and --tower-threads must be >= 1")
    if args.frames < 0:
        raise SystemExit("--frames must be >= 0 (0: images)")
    args.configs = args.configs or default_configs(args.frames)
    args.chat_content_format = "the server's" if args.base_url else "openai"
    names = [c.strip().lower() for c in args.configs.split(",") if c.strip()]
    plugin_names = [n for n in names if not is_stock(n)]
    configs = parse_configs(",".join(plugin_names)) if plugin_names else []
    stock_configs = [BenchConfig(n, "off") for n in names if is_stock(n)]
    if stock_configs and args.base_url:
        raise SystemExit("the stock configuration needs a server started by this script")
    import torch

    has_gpu = torch.cuda.is_available()
    if args.enforce_eager is None:
        args.enforce_eager = not has_gpu
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment({"device": "cuda" if has_gpu else "cpu"})
    print(env["cpu_line"], flush=True)
    wall = time.perf_counter()
    started: dict[str, float] = {}
    servers: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    served_model = None
    if args.base_url:
        model = args.model or "(served model)"
        base = args.base_url.rstrip("/")
        data = asyncio.run(benchmark(base, args, configs))
        runs, served_model = data["runs"], data["served_model"]
        servers["plugin"] = f"given ({base})"
    else:
        model = args.model or synthetic_checkpoint(args.synthetic, args.family, args.tower)[0]
        if args.frames:  # a template that drops video parts: vLLM's "string" content format
            args.chat_content_format = chat_prompt(model, args.frames).content_format
        # One server per stock dtype (`stock:DTYPE`), then the plugin's.
        groups = [(True, [c], c.name.partition(":")[2] or None) for c in stock_configs]
        for stock, group, dtype in [*groups, (False, configs, None)]:
            if not group:
                continue
            key = group[0].name if stock else "plugin"
            data, servers[key], started[key] = start_and_measure(
                args, model, group, stock=stock, out=out, dtype=dtype
            )
            runs += data["runs"]
            served_model = data["served_model"]
    if args.base_url and not args.model:
        model = served_model
    fill_stock_visual_tokens(runs)
    add_ratios(runs)
    result: dict[str, Any] = {
        "benchmark": "serving (vllm serve, OpenAI chat API)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model_label(args) if not args.base_url else model,
        "model_path": model,
        "served_model": served_model,
        "server": "; ".join(f"{k}: {v}" for k, v in servers.items()),
        "servers": servers,
        "server_startup_s": started,
        "settings": dict(vars(args)),
        "method": METHOD,
        "environment": env,
        "runs": runs,
    }
    return finish(out, "serving", result, wall, markdown_report, None if args.no_plots else plot)


if __name__ == "__main__":
    main()
