"""Online serving benchmark: `vllm serve --plugin prumerge` with stock 576 tokens vs PruMerge.

The same workload as `throughput.py` (generated scenes or your images, questions of varied
length, fixed output length) is sent to one OpenAI-compatible server through the chat API, one
configuration after another, each request choosing its PruMerge mode with
`extra_body={"mm_processor_kwargs": {"prumerge": ...}}`. Per configuration: TTFT, TPOT, ITL and
end-to-end latency percentiles, request and token throughput, prompt tokens (the server's
`usage`), visual tokens per image (the server's `vllm_prumerge:visual_tokens_per_image`
histogram, read from `/metrics` around each batch) and the peak KV-cache usage / running
requests sampled from `/metrics`, each with its ratio to `off`.

    python benchmarks/serving.py --out out/serving                      # starts its own server
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --out out/serving

The server this script starts uses the same engine settings as `throughput.py` (prefix caching
and the processor cache off, fixed KV-cache size); a server given with `--base-url` is used as
it is: start it with `--plugin prumerge --trust-request-mm-kwargs` (requests choose their
configuration) and, for comparable figures, `--no-enable-prefix-caching --mm-processor-cache-gb 0`.

Writes OUT/serving.json, OUT/serving.md and OUT/serving_latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEFAULT_CONFIGS,
    SYNTHETIC_SPECS,
    TOKEN_TICKS,
    BenchConfig,
    WorkItem,
    build_workload,
    environment,
    markdown_table,
    parse_configs,
    progress,
    summary,
    synthetic_checkpoint,
    write_outputs,
)

VISUAL_METRIC = "vllm_prumerge:visual_tokens_per_image"
KV_METRIC = "vllm:kv_cache_usage_perc"
RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"


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
        "a folder). Default: a generated random-weight LLaVA-1.5-shaped checkpoint (see "
        "--synthetic). With --base-url: the served model name (default: the server's first).",
    )
    srv.add_argument(
        "--synthetic",
        choices=sorted(SYNTHETIC_SPECS),
        default="small",
        help="Size of the generated checkpoint when --model is not given (as in throughput.py).",
    )
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
        default=DEFAULT_CONFIGS,
        help="Comma-separated configurations, as in throughput.py: off, prumerge, prumerge+, "
        "fixed:N, fixed:Ns, fixed:RATIO. Ratios are taken to 'off' (or to the configuration "
        "with the most prompt tokens when 'off' is absent).",
    )
    work.add_argument(
        "--num-prompts", type=int, default=64, help="Measured requests per configuration."
    )
    work.add_argument(
        "--output-len",
        type=int,
        default=32,
        help="Generated tokens per request (fixed: ignore_eos, greedy).",
    )
    work.add_argument("--seed", type=int, default=0, help="Seed of images, questions, arrivals.")
    work.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="Use the images in DIR (name order, cycled) instead of generated scenes.",
    )
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
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        default="out/serving",
        metavar="DIR",
        help="Folder for serving.json, serving.md, serving_latency.png (and server.log).",
    )
    out.add_argument("--no-plots", action="store_true", help="Skip the PNG plot.")
    out.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser


# --------------------------------------------------------------------------------------------
# Server


def server_args(args: argparse.Namespace) -> list[str]:
    """`vllm serve` arguments: the plugin and the engine settings of throughput.py."""
    result = [
        "--plugin",
        "prumerge",
        "--trust-request-mm-kwargs",  # lets each request choose its configuration
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--block-size",
        str(args.block_size),
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--no-enable-prefix-caching",
        "--mm-processor-cache-gb",
        "0",
    ]
    if args.kv_cache_tokens:
        result += [
            "--num-gpu-blocks-override",
            str(max(1, args.kv_cache_tokens // args.block_size)),
        ]
    if args.enforce_eager:
        result.append("--enforce-eager")
    return result + list(args.server_arg)


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> {sample name: [(labels, value)]} (enough for vLLM's metrics)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        labels: dict[str, str] = {}
        if brace:
            for part in rest.rstrip("}").split('",'):
                key, _, val = part.partition("=")
                if key:
                    labels[key.strip().strip(",")] = val.strip().strip('"')
        try:
            samples.setdefault(name.strip(), []).append((labels, float(value)))
        except ValueError:
            continue
    return samples


def metric_total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def metric_max(samples: dict[str, Any], name: str) -> float | None:
    values = [v for _, v in samples.get(name, [])]
    return max(values) if values else None


# --------------------------------------------------------------------------------------------
# Client


def data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def one_request(
    client: Any,
    model: str,
    item: WorkItem,
    url: str,
    config: BenchConfig,
    output_len: int,
) -> dict[str, Any]:
    """One streamed chat completion; timings as `vllm bench serve` (openai-chat) takes them:
    TTFT at the first chunk with choices, ITL between later chunks, latency at the last."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": item.question},
            ],
        }
    ]
    result: dict[str, Any] = {"ok": False, "ttft": None, "itl": [], "latency": None}
    start = time.perf_counter()
    last = start
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=output_len,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={
                "ignore_eos": True,
                "mm_processor_kwargs": {"prumerge": config.prumerge},
            },
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


async def run_batch(
    client: Any,
    model: str,
    items: list[WorkItem],
    urls: list[str],
    config: BenchConfig,
    args: argparse.Namespace,
    rate: float,
    bar: Any,
) -> tuple[list[dict[str, Any]], float]:
    """Send `items` with Poisson arrivals at `rate` (inf: all at once), at most
    `--max-concurrency` in flight; returns (results in order, seconds first send -> last end)."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency > 0 else None
    rng = random.Random(args.seed)

    async def guarded(item: WorkItem, url: str) -> dict[str, Any]:
        if limit is None:
            result = await one_request(client, model, item, url, config, args.output_len)
        else:
            async with limit:
                result = await one_request(client, model, item, url, config, args.output_len)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for i, (item, url) in enumerate(zip(items, urls, strict=True)):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(guarded(item, url)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def fetch_metrics(http: Any, base_url: str) -> dict[str, Any]:
    response = await http.get(base_url + "/metrics")
    response.raise_for_status()
    return parse_prometheus(response.text)


async def measure_batch(
    client: Any,
    http: Any,
    base_url: str,
    model: str,
    items: list[WorkItem],
    urls: list[str],
    config: BenchConfig,
    args: argparse.Namespace,
    rate: float,
    bar: Any,
) -> dict[str, Any]:
    """One measured batch: per-request results, its duration, the server's visual-token
    histogram change for this mode, and the /metrics peaks sampled meanwhile."""
    before = await fetch_metrics(http, base_url)
    peaks: dict[str, Any] = {}
    sampler = asyncio.create_task(sample_metrics(http, base_url, args.metrics_interval, peaks))
    try:
        results, seconds = await run_batch(client, model, items, urls, config, args, rate, bar)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    after = await fetch_metrics(http, base_url)
    visual = {}
    for suffix in ("sum", "count"):
        name = f"{VISUAL_METRIC}_{suffix}"
        visual[suffix] = metric_total(after, name, mode=config.mode) - metric_total(
            before, name, mode=config.mode
        )
    visual["mean"] = visual["sum"] / visual["count"] if visual["count"] else math.nan
    return {"results": results, "seconds": seconds, "visual": visual, "peaks": peaks}


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
        "ttft_ms": {k: 1e3 * v for k, v in summary([r["ttft"] for r in ok]).items()},
        "tpot_ms": {k: 1e3 * v for k, v in summary(tpot).items()},
        "itl_ms": {k: 1e3 * v for k, v in summary(itl).items()},
        "e2el_ms": {k: 1e3 * v for k, v in summary([r["latency"] for r in ok]).items()},
        "peak_kv_cache_usage_sampled": peaks.get("peak_kv_cache_usage") if sampled else None,
        "max_running_requests_sampled": peaks.get("max_running_requests") if sampled else None,
        "max_waiting_requests_sampled": peaks.get("max_waiting_requests") if sampled else None,
        "metrics_samples": peaks.get("samples", 0),
    }


async def benchmark(base_url: str, args: argparse.Namespace, configs: list[BenchConfig]) -> dict:
    import httpx
    from openai import AsyncOpenAI

    rates = [float(r) for r in args.request_rate.split(",") if r.strip()]
    items = build_workload(args.num_prompts, args.seed, args.images)
    warm = build_workload(
        args.warmup * len(configs) * len(rates) * args.repeats + 2,
        args.seed,
        args.images,
        start=args.num_prompts,
    )
    urls = [data_url(item.image) for item in items]
    warm_urls = [data_url(item.image) for item in warm]
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
    silent = progress(0, "", disable=True)
    # A first round of every configuration: loads the tower in the server's front end and
    # touches every code path before anything is measured.
    for config in configs:
        await run_batch(client, model, warm[:2], warm_urls[:2], config, args, math.inf, silent)
    warm_index = 2
    pooled: dict[tuple[float, str], list[dict[str, Any]]] = {}
    total = len(configs) * len(rates) * args.num_prompts * args.repeats
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
                            warm[chosen],
                            warm_urls[chosen],
                            config,
                            args,
                            rate,
                            silent,
                        )
                    bar.set_description(f"{config.name} @ {rate:g} req/s")
                    measured = await measure_batch(
                        client, http, base_url, model, items, urls, config, args, rate, bar
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
                        f"{measured['visual']['mean']:.1f} visual tok/img"
                    )
    runs = [
        {
            "name": config.name,
            "prumerge": config.prumerge,
            "request_rate": rate,
            **figures(pooled[(rate, config.name)]),
        }
        for rate in rates
        for config in configs
    ]
    await client.close()
    await http.aclose()
    return {"served_model": model, "runs": runs}


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


# --------------------------------------------------------------------------------------------
# Reports


def markdown_report(data: dict[str, Any]) -> str:
    env = data["environment"]
    settings = data["settings"]
    lines = [
        "# Serving: visual tokens per image vs latency and throughput (vllm serve)",
        "",
        f"Model: `{data['model']}`; server: {data['server']}; {settings['num_prompts']} "
        f"requests per configuration and repeat ({settings['repeats']} repeats, pooled), "
        f"{settings['output_len']} output tokens each, max concurrency "
        f"{settings['max_concurrency'] or 'unlimited'}; device: "
        f"{env.get('gpu') or env['cpu']} ({env['cpu_count']} CPUs); {env['date']}.",
        "",
        "Latencies in ms (p50 / p99). `x` = ratio to the baseline (`off`) at the same request "
        "rate; `ideal x` = prompt-token ratio (the speed-up if cost were proportional to prompt "
        "tokens). Visual tokens: the server's own histogram; peak KV and running: sampled from "
        "/metrics.",
        "",
        markdown_table(
            [
                "config",
                "rate",
                "visual tok/img",
                "prompt tok",
                "req/s",
                "x",
                "ideal x",
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


def plot(data: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        axes[2].set_title("requests / s")
        for r in group:
            axes[2].annotate(
                r["name"],
                (r["visual_tokens_mean"], r["requests_per_s"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(TOKEN_TICKS, [str(t) for t in TOKEN_TICKS])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens per image (mean, log scale)")
        ax.legend(fontsize=7)
    env = data["environment"]
    fig.suptitle(
        f"{data['model']}: {data['settings']['num_prompts']} requests, max concurrency "
        f"{data['settings']['max_concurrency']}; {env.get('gpu') or env['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "serving_latency.png", dpi=120)
    plt.close(fig)
    return ["serving_latency.png"]


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
    "vllm:kv_cache_usage_perc and vllm:num_requests_running sampled from /metrics."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.output_len < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--num-prompts, --output-len and --repeats must be >= 1, --warmup >= 0")
    configs = parse_configs(args.configs)
    import torch

    has_gpu = torch.cuda.is_available()
    if args.enforce_eager is None:
        args.enforce_eager = not has_gpu
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment({"device": "cuda" if has_gpu else "cpu"})
    wall = time.perf_counter()
    started = None
    if args.base_url:
        model = args.model or "(served model)"
        base = args.base_url.rstrip("/")
        data = asyncio.run(benchmark(base, args, configs))
        server = f"given ({base})"
    else:
        if args.model:
            model = args.model
        else:
            model, _ = synthetic_checkpoint(args.synthetic)
        from vllm_prumerge.testing.server import serve

        server_env = {} if has_gpu else {"VLLM_TARGET_DEVICE": "cpu"}
        if not has_gpu:
            server_env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        cli = server_args(args)
        t0 = time.perf_counter()
        with serve(
            model,
            cli,
            env=server_env,
            timeout=args.server_timeout,
            log_path=out / "server.log",
        ) as base:
            started = time.perf_counter() - t0
            data = asyncio.run(benchmark(base, args, configs))
        server = "`vllm serve MODEL " + " ".join(cli) + "`"
    if args.base_url and not args.model:
        model = data["served_model"]
    add_ratios(data["runs"])
    result: dict[str, Any] = {
        "benchmark": "serving (vllm serve, OpenAI chat API)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model if args.model or args.base_url else f"generated:{args.synthetic}",
        "model_path": model,
        "served_model": data["served_model"],
        "server": server,
        "server_startup_s": started,
        "settings": dict(vars(args)),
        "method": METHOD,
        "environment": env,
        "runs": data["runs"],
        "total_seconds": time.perf_counter() - wall,
    }
    if not args.no_plots:
        result["plots"] = plot(result, out)
    write_outputs(out, "serving", result, markdown_report(result))
    return result


if __name__ == "__main__":
    main()
