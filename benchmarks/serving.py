"""Online serving benchmark: `vllm serve --plugin prumerge` with stock token counts vs PruMerge,
against stock vLLM and against text-only requests of the same length, driven by `vllm bench serve`
on a dataset this script writes; `stock` (`stock:DTYPE`) runs on a second server. Method:
docs/benchmarks.md.

    python benchmarks/serving.py --out out/serving                      # starts its own server
    python benchmarks/serving.py --tower real --configs stock,off,prumerge --out out/real
    python benchmarks/serving.py --family next_video --frames 8 --out out/serving-video
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --out out/serving
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shlex
import time
from pathlib import Path
from typing import Any

import _cli
import _report
from _common import (
    BenchConfig,
    bench_serve,
    bench_serve_argv,
    chat_prompt,
    fair_settings,
    rotated,
    summary,
    trust_hint,
    workloads,
    write_dataset,
)

from vllm_prumerge.testing.engine_args import add_engine_arguments, add_number_options, serve_flags
from vllm_prumerge.testing.media import image_data_url, video_data_url
from vllm_prumerge.testing.prometheus import (
    fetch_metrics,
    metric_max,
    metric_total,
    parse_prometheus,
)
from vllm_prumerge.testing.prompts import chat_messages
from vllm_prumerge.testing.workload import WorkItem

VISUAL_METRIC = "vllm_prumerge:visual_tokens_per_image"
VIDEO_METRIC = "vllm_prumerge:visual_tokens_per_video"
TOWER_METRIC = "vllm_prumerge:reduction_seconds_sum"  # tower + reduction, per processed batch
PEAK_METRICS = {  # sampled from /metrics during every run: the peaks are kept
    "peak_kv_cache_usage": "vllm:kv_cache_usage_perc",
    "max_running_requests": "vllm:num_requests_running",
    "max_waiting_requests": "vllm:num_requests_waiting",
}
# The ratios of a run (name: dotted path of the figure): to the baseline; to stock and text.
BASELINE_RATIOS = {
    "requests_per_s": "requests_per_s",
    "output_tokens_per_s": "output_tokens_per_s",
    "prompt_tokens": "prompt_tokens.mean",
    "ttft_p50": "ttft_ms.p50",
    "ttft_mean": "ttft_ms.mean",
    "tpot_p50": "tpot_ms.p50",
    "e2el_p50": "e2el_ms.p50",
}
OTHER_RATIOS = {"requests_per_s": "requests_per_s", "ttft_p50": "ttft_ms.p50"}
FILLER = " the"  # one text token per repetition in LLaVA's tokenizers; checked with /tokenize


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.new_parser(
        __doc__,
        "TTFT, TPOT, ITL, end-to-end latency and throughput per configuration; JSON, "
        "Markdown and PNG output.",
    )
    srv = parser.add_argument_group("server")
    srv.add_argument(
        "--base-url",
        default=None,
        help="Use this running server (e.g. http://127.0.0.1:8000, started with `vllm serve MODEL "
        "--plugin prumerge --trust-request-mm-kwargs`, for comparable figures also "
        "`--no-enable-prefix-caching --mm-processor-cache-gb 0`) instead of starting one.",
    )
    _cli.add_model_arguments(
        srv,
        "Checkpoint the started server serves (hub id such as llava-hf/llava-1.5-7b-hf, or a "
        "folder). Default: a generated random-weight checkpoint (--synthetic, --family, "
        "--tower). With --base-url: the served model name (default: the server's first).",
    )
    add_number_options(
        srv,
        ("--tower-threads", int, None, "Torch threads of the plugin's vision tower in the "
         "started server (sets VLLM_PRUMERGE_TOWER_THREADS). Default: the server's own (the "
         "cores it may run on / --api-server-count)."),
        ("--api-server-count", int, 1, "--api-server-count of the started servers: API-server "
         "processes, each with its own pre-processor (and, with the plugin, its own tower)."),
        ("--server-timeout", float, 900, "Seconds to wait for a started server's /health."),
    )  # fmt: skip
    add_engine_arguments(
        parser, kv_cache=True, title="engine of the started servers", target="vllm serve option"
    )
    work = parser.add_argument_group("workload")
    _cli.add_workload_arguments(
        work, "Seed of images, questions and arrivals (vllm bench serve's)."
    )
    _cli.add_comparison_arguments(
        work,
        stock="stock (stock vLLM, no plugin, on a second server this script starts; stock:DTYPE: "
        "one more stock server at that --dtype, e.g. stock:float32)",
        repeats=2,
        pooling="percentiles are over all repeats' requests, throughput over their total time",
    )
    work.add_argument(
        "--request-rate",
        default="inf",
        help="Request arrival rate(s) in requests/s (vllm bench serve's --request-rate: Poisson "
        "arrivals, seeded); 'inf' sends all at once (then --max-concurrency alone limits). A "
        "comma-separated list runs a sweep: every configuration at every rate.",
    )
    add_number_options(
        work,
        ("--max-concurrency", int, 8, "Most requests in flight at once (0 = unlimited)."),
        ("--metrics-interval", float, 0.25, "Seconds between /metrics samples (peak KV-cache "
         "usage, running and waiting requests)."),
    )  # fmt: skip
    for group, flag, target, example in (
        (srv, "--server-arg", "the started `vllm serve`", "=--gpu-memory-utilization=0.8"),
        (work, "--bench-arg", "every `vllm bench serve` run", "=--burstiness=0.5"),
    ):
        group.add_argument(
            flag,
            action="append",
            default=[],
            metavar="ARG",
            help=f"Extra argument for {target} (repeatable; the = form for values, e.g. "
            f"{flag}{example}).",
        )
    _cli.add_output_arguments(
        parser,
        "out/serving",
        "Folder for serving.json, serving.md, serving_latency.png, server.log, the datasets "
        "sent (datasets/) and vllm bench serve's results (vllm-bench-serve/).",
        plots="PNG plot",
    )
    return parser


def server_args(args: argparse.Namespace, *, stock: bool, dtype: str | None = None) -> list:
    """`vllm serve` arguments: the plugin (not for `stock`) and the engine settings of
    throughput.py, from the shared engine options."""
    settings = {"api_server_count": args.api_server_count, **fair_settings(args)}
    if dtype:
        settings["dtype"] = dtype
    if args.frames:  # every frame of the clip, as sent (vLLM's loader samples 32 by default)
        settings["media_io_kwargs"] = {"video": {"num_frames": args.frames}}
        if args.chat_content_format != "openai":  # the template drops video parts
            settings["chat_template_content_format"] = args.chat_content_format
    # --trust-request-mm-kwargs lets each request choose its configuration.
    plugin = [] if stock else ["--plugin", "prumerge", "--trust-request-mm-kwargs"]
    return plugin + serve_flags(settings) + list(args.server_arg)


def bench_argv(args, base: str, model: str, dataset: Path, count: int, rate: float, **kw) -> list:
    """`vllm bench serve` arguments (`_common.bench_serve_argv`) for the `count` requests of
    `dataset` at `rate`, --ignore-eos; keywords: `prumerge`, the configuration sent in
    --extra-body (None: no plugin kwargs), and `result`, the path of its saved result."""
    prumerge = kw.get("prumerge")
    body = {} if prumerge is None else {"mm_processor_kwargs": {"prumerge": prumerge}}
    options = {"body": body, "ignore_eos": True, "rate": rate, "concurrency": args.max_concurrency}
    options |= {"seed": args.seed, "result": kw.get("result"), "quiet": args.no_progress}
    return bench_serve_argv(
        base, model, dataset, count, args.output_len, **options, extra=args.bench_arg
    )


def media_url(item: WorkItem) -> str:
    """The data URL of what the request sends: a PNG image, or an MP4 of the video's frames."""
    return image_data_url(item.image) if item.video is None else video_data_url(item.video)


def media_parts(items: list[WorkItem]) -> list[list[dict[str, Any]]]:
    """Each item's chat message: an `image_url` or a `video_url` part, then the question."""
    return [
        chat_messages(item.question, **{f"{item.modality}_urls": [media_url(item)]})[0]["content"]
        for item in items
    ]


def text_parts(question: str, fillers: int) -> list[dict[str, Any]]:
    """The text-only chat message: `fillers` filler words (for the media), then the question."""
    return [{"type": "text", "text": FILLER * fillers + question}]


async def sample_metrics(http: Any, base_url: str, interval: float, peaks: dict) -> None:
    """Poll /metrics until cancelled; keep the peaks of KV usage, running and waiting."""
    while True:
        with contextlib.suppress(Exception):
            samples = parse_prometheus((await http.get(base_url + "/metrics")).text)
            for key, name in PEAK_METRICS.items():
                if (value := metric_max(samples, name)) is not None:
                    peaks[key] = max(peaks.get(key, 0.0), value)
            peaks["samples"] = peaks.get("samples", 0) + 1
        await asyncio.sleep(interval)


async def measured_run(
    http: Any, base: str, argv: list[str], mode: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """One measured `vllm bench serve` run: its requests, its duration, the change of the
    server's visual-token histogram and tower time for `mode` (None: not read) and the /metrics
    peaks sampled meanwhile."""
    before = fetch_metrics(base)
    peaks: dict[str, Any] = {}
    sampler = asyncio.create_task(sample_metrics(http, base, args.metrics_interval, peaks))
    try:
        result = await bench_serve(argv)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    after = fetch_metrics(base)

    def delta(name: str) -> float:
        if mode is None:
            return 0.0
        return metric_total(after, name, mode=mode) - metric_total(before, name, mode=mode)

    metric = VIDEO_METRIC if args.frames else VISUAL_METRIC
    keys = ("prompt_tokens", "output_tokens", "ttft", "itl", "latency", "error")
    columns = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "errors")
    rows = zip(*(result[c] for c in columns), strict=True)
    requests = [dict(zip(keys, values, strict=True)) for values in rows]
    for r in requests:
        r["ok"] = not r["error"] and r["output_tokens"] > 0
        r["error"] = r["error"][-500:]
    return {
        "requests": requests,
        "seconds": result["duration"],
        "visual": {"sum": delta(metric + "_sum"), "count": delta(metric + "_count")},
        "tower_seconds": delta(TOWER_METRIC),
        "peaks": peaks,
    }


def figures(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one configuration pooled over its repeats: percentiles over every request,
    throughput = completed requests / total measured seconds, peaks = max over repeats."""
    results = [r for batch in batches for r in batch["requests"]]
    ok = [r for r in results if r["ok"]]
    seconds = sum(batch["seconds"] for batch in batches)
    prompt, output = [r["prompt_tokens"] for r in ok], [r["output_tokens"] for r in ok]
    tpot = [
        (r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1
    ]
    visual_sum, visual_count = (sum(b["visual"][k] for b in batches) for k in ("sum", "count"))
    tower_seconds = sum(batch["tower_seconds"] for batch in batches)
    samples = sum(batch["peaks"].get("samples", 0) for batch in batches)
    peaks = {k: [b["peaks"][k] for b in batches if k in b["peaks"]] for k in PEAK_METRICS}
    # Too few samples (batches shorter than a few intervals) would read as zero: omitted.
    sampled = samples >= 3 * len(batches)

    def ms(values: list[float]) -> dict[str, float]:
        return {k: 1e3 * v for k, v in summary(values).items()}

    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "repeats": len(batches),
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds,
        "requests_per_s_per_repeat": [
            sum(r["ok"] for r in batch["requests"]) / batch["seconds"] for batch in batches
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
        "ttft_ms": ms([r["ttft"] for r in ok]),
        "tpot_ms": ms(tpot),
        "itl_ms": ms([x for r in ok for x in r["itl"]]),
        "e2el_ms": ms([r["latency"] for r in ok]),
        **{f"{k}_sampled": max(v) if sampled and v else None for k, v in peaks.items()},
        "metrics_samples": samples,
    }


class TextPadder:
    """Text-only chat messages with exactly a given number of prompt tokens: the question after
    filler words, their count found with the server's own /tokenize (cached)."""

    def __init__(self, http: Any, base_url: str, model: str) -> None:
        self.http, self.base_url, self.model = http, base_url, model
        self.found: dict[tuple[str, int], list[dict[str, Any]]] = {}

    async def count(self, question: str, fillers: int) -> int:
        messages = [{"role": "user", "content": text_parts(question, fillers)}]
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        response = await self.http.post(self.base_url + "/tokenize", json=body)
        response.raise_for_status()
        return int(response.json()["count"])

    async def parts(self, question: str, target: int) -> list[dict[str, Any]]:
        """The message's parts: `target` prompt tokens, unless no filler count reaches it."""
        if (question, target) not in self.found:
            fillers = max(0, target - await self.count(question, 0))
            for _ in range(5):
                tokens = await self.count(question, fillers)
                if tokens == target:
                    break
                fillers = max(0, fillers + target - tokens)
            self.found[(question, target)] = text_parts(question, fillers)
        return self.found[(question, target)]


async def benchmark(base: str, args: argparse.Namespace, configs: list[BenchConfig]) -> dict:
    """Every configuration of `configs` (all served by the server at `base`), with its
    text-equivalent when --text; returns the served model name, one run per (rate, config) and
    a `vllm bench serve` command line of a measured run."""
    import httpx

    out = Path(args.out)
    rates = [float(r) for r in args.request_rate.split(",") if r.strip()]
    items, warm = workloads(args, args.warmup * len(configs) * len(rates) * args.repeats + 2)
    dataset = write_dataset(out / "datasets" / "requests.jsonl", media_parts(items))
    http = httpx.AsyncClient(timeout=600.0)
    model = args.model if args.base_url and args.model else None
    if model is None:
        model = (await http.get(base + "/v1/models")).json()["data"][0]["id"]
    padder = TextPadder(http, base, model)

    async def warm_up(config: BenchConfig, start: int, count: int, rate: float) -> None:
        chosen = media_parts(warm[start : start + count])
        path = write_dataset(out / "datasets" / f"warm-{start + count}.jsonl", chosen)
        argv = bench_argv(args, base, model, path, count, rate, prumerge=config.prumerge)
        await bench_serve(argv)

    # A first round of every configuration, on the same two images: loads the tower in the
    # server's front end and touches every code path before anything is measured.
    for config in configs:
        await warm_up(config, 0, 2, math.inf)
    used = 2  # warm-up items used so far
    # Per (rate, configuration): its measured runs, its text-equivalents' and their targets.
    pooled = {(rate, c.name): ([], [], []) for rate in rates for c in configs}
    command = ""
    for repeat in range(args.repeats):
        for rate in rates:
            for config in rotated(configs, repeat):
                if args.warmup:
                    await warm_up(config, used, args.warmup, rate)
                    used += args.warmup
                images, texts, targets = pooled[(rate, config.name)]
                tag = f"{config.name.replace('/', '_')}-{rate:g}-{repeat}"  # a file name
                result = out / "vllm-bench-serve" / f"{tag}.json"
                option = {"prumerge": config.prumerge, "result": result}
                argv = bench_argv(args, base, model, dataset, len(items), rate, **option)
                command = command or "vllm bench serve " + shlex.join(argv)
                measured = await measured_run(http, base, argv, config.mode, args)
                images.append(measured)
                if not any(r["ok"] for r in measured["requests"]):
                    errors = sorted({r["error"] for r in measured["requests"]})[:3]
                    hint = trust_hint(errors)
                    raise RuntimeError(f"every request of {config.name} failed{hint}: {errors}")
                if args.text:  # per completed request: its question padded to its prompt tokens
                    done = [
                        (item, r["prompt_tokens"])
                        for item, r in zip(items, measured["requests"], strict=True)
                        if r["ok"]
                    ]
                    parts = [await padder.parts(item.question, n) for item, n in done]
                    path = write_dataset(out / "datasets" / f"text-{tag}.jsonl", parts)
                    result = out / "vllm-bench-serve" / f"text-{tag}.json"
                    argv = bench_argv(args, base, model, path, len(parts), rate, result=result)
                    texts.append(await measured_run(http, base, argv, None, args))
                    targets.extend(n for _, n in done)
    await http.aclose()
    runs = []
    for rate in rates:
        for config in configs:
            images, texts, targets = pooled[(rate, config.name)]
            run = {"name": config.name, "prumerge": config.prumerge, "request_rate": rate}
            run |= figures(images)
            if args.text:
                run["text"] = {**figures(texts), "target_prompt_tokens": summary(targets)}
            runs.append(run)
    return {"served_model": model, "runs": runs, "bench_serve_command": command}


def fill_stock_visual_tokens(runs: list[dict[str, Any]]) -> None:
    """Visual tokens of `stock` runs (no plugin histogram): its prompt tokens minus the text
    tokens of the same requests, known from a plugin run at the same rate (prompt - visual)."""
    for r in (r for r in runs if r["prumerge"] is None):
        rate = r["request_rate"]
        plugin = [o for o in runs if o["prumerge"] is not None and o["request_rate"] == rate]
        if known := next((o for o in plugin if not math.isnan(o["visual_tokens_mean"])), None):
            text = known["prompt_tokens"]["mean"] - known["visual_tokens_mean"]
            r["visual_tokens_mean"] = r["prompt_tokens"]["mean"] - text
            r["visual_tokens_source"] = f"prompt tokens - text tokens of {known['name']}"


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Per request rate: ratios to the baseline (`_report.pick_baseline`), to `stock`, and to
    each run's own text-equivalent."""
    for rate in sorted({r["request_rate"] for r in runs}):
        group = [r for r in runs if r["request_rate"] == rate]
        base = _report.pick_baseline(group)
        stock = next((o for o in group if o["name"] == "stock"), None)
        for r in group:
            r["baseline"] = base["name"]
            r["ideal_speedup"] = base["prompt_tokens"]["mean"] / r["prompt_tokens"]["mean"]
            r["ratio_to_baseline"] = _report.ratios(r, base, BASELINE_RATIOS)
            if stock is not None:
                r["ratio_to_stock"] = _report.ratios(r, stock, OTHER_RATIOS)
            if "text" in r:
                r["fraction_of_text"] = _report.ratios(r, r["text"], OTHER_RATIOS)


def markdown_report(data: dict[str, Any]) -> str:
    env, settings = data["environment"], data["settings"]
    short, long = _report.media_labels(settings)
    has_stock = any("ratio_to_stock" in r for r in data["runs"])
    head = [("config", "name"), ("rate", "request_rate")]
    head += [(f"visual tok/{short}", "visual_tokens_mean"), ("prompt tok", "prompt_tokens.mean")]
    text_columns = [
        *head,
        ("text prompt tok", "text.prompt_tokens.mean"),
        ("req/s", "requests_per_s"),
        ("text-equiv. req/s", "text.requests_per_s"),
        ("of text", "fraction_of_text.requests_per_s"),
        ("x off", "ratio_to_baseline.requests_per_s"),
        *([("x stock", "ratio_to_stock.requests_per_s")] if has_stock else []),
        ("TTFT p50", "ttft_ms.p50"),
        ("text TTFT p50", "text.ttft_ms.p50"),
        ("E2E p50", "e2el_ms.p50"),
        ("text E2E p50", "text.e2el_ms.p50"),
        (f"tower ms/{short}", "tower_ms_per_image"),
        ("tower busy", lambda r: None if r["prumerge"] is None else r["tower_busy"]),
    ]
    text_intro = (
        f"`text@CONFIG`: each completed request's message without the {long}, padded with a "
        "filler word to its prompt tokens (`text prompt tok` shows the match), measured right "
        f"after the {long} requests. `of text` = {long} req/s / text req/s: 1.0 = the {long}s "
        f"cost nothing beyond their tokens. `x stock` = ratio to stock vLLM's req/s. `tower "
        f"ms/{short}` = the plugin's tower + reduction time per {long} in the server; `tower "
        "busy` = its sum / the batch's duration (near 1 per API server: the front end is the "
        "bottleneck)."
    )
    peak_kv = "peak_kv_cache_usage_sampled"
    columns = [
        *head,
        ("req/s", "requests_per_s"),
        ("x", "ratio_to_baseline.requests_per_s"),
        ("prompt-ratio ideal x", "ideal_speedup"),
        ("out tok/s", "output_tokens_per_s"),
        ("TTFT p50", "ttft_ms.p50"),
        ("TTFT p99", "ttft_ms.p99"),
        ("TTFT x", "ratio_to_baseline.ttft_p50"),
        ("TPOT p50", "tpot_ms.p50"),
        ("TPOT p99", "tpot_ms.p99"),
        ("ITL p50", "itl_ms.p50"),
        ("E2E p50", "e2el_ms.p50"),
        ("E2E p99", "e2el_ms.p99"),
        ("E2E x", "ratio_to_baseline.e2el_p50"),
        ("peak KV %", lambda r: None if r[peak_kv] is None else 100 * r[peak_kv]),
        ("max running", "max_running_requests_sampled"),
        ("failed", "failed"),
    ]
    lines = [
        f"# Serving: visual tokens per {long} vs latency and throughput (vllm serve)",
        "",
        *_report.video_note(settings, f"Sent as an MP4 `video_url`, counted by `{VIDEO_METRIC}`."),
        f"Model: `{data['model']}`; server: {data['server']}; {settings['num_prompts']} "
        f"requests per configuration and repeat ({settings['repeats']} repeats, pooled), "
        f"{settings['output_len']} output tokens each, max concurrency "
        f"{settings['max_concurrency'] or 'unlimited'}; {_report.device_line(env)}.",
        "",
        f"Latencies in ms. {_report.BASELINE_RULE} Each at the same request rate; "
        "`prompt-ratio ideal x` = prompt-token ratio (cost proportional to prompt tokens; no "
        "engine reaches it). `stock`'s visual tokens: its prompt tokens minus the text tokens.",
        "",
        *_report.text_section(data["runs"], text_intro, text_columns),
        "## All figures",
        "",
        _report.table(data["runs"], columns),
        "Method: " + data["method"],
        "",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """serving_latency.png: TTFT, end-to-end latency and requests/s against visual tokens."""
    fig, axes = _report.pyplot().subplots(1, 3, figsize=(15, 4.6))
    for i, rate in enumerate(sorted({r["request_rate"] for r in data["runs"]})):
        group = [r for r in data["runs"] if r["request_rate"] == rate]
        xs, colour, tag = [r["visual_tokens_mean"] for r in group], f"C{i}", f"rate {rate:g}"
        for ax, key in zip(axes[:2], ("ttft_ms", "e2el_ms"), strict=True):
            ax.scatter(xs, [r[key]["p50"] for r in group], color=colour, label=f"p50, {tag}")
            ys = [r[key]["p99"] for r in group]
            ax.scatter(xs, ys, color=colour, marker="^", label=f"p99, {tag}")
        rps = [r["requests_per_s"] for r in group]
        axes[2].scatter(xs, rps, color=colour, label=tag)
        if texts := [r for r in group if "text" in r and not math.isnan(r["visual_tokens_mean"])]:
            text_xs = [r["visual_tokens_mean"] for r in texts]
            text_ys = [r["text"]["requests_per_s"] for r in texts]
            style = {"facecolors": "none", "edgecolors": colour, "marker": "s"}
            axes[2].scatter(text_xs, text_ys, **style, label=f"text-equivalent, {tag}")
        _report.label_points(axes[2], group, xs, rps)
    known = [r["visual_tokens_mean"] for r in data["runs"]]
    largest = max((v for v in known if not math.isnan(v)), default=576)
    titles = ("TTFT (ms)", "end-to-end latency (ms)", "requests / s")
    for ax, name in zip(axes, titles, strict=True):
        _report.token_axis(ax, largest, _report.media_labels(data["settings"])[1], legend=7)
        ax.set_title(name)
    title = _report.plot_title(data, f"max concurrency {data['settings']['max_concurrency']}")
    return [_report.save_figure(fig, out, "serving_latency.png", title)]


METHOD = (
    "One server, one configuration after another, each run by `vllm bench serve` (openai-chat, "
    "custom dataset, in this process) on the same chat messages, the configuration in "
    "--extra-body; streamed, --ignore-eos, greedy; TTFT, ITL and latency per request "
    "(--save-detailed), TPOT = (latency - TTFT) / (output tokens - 1). A first round of every "
    "configuration (2 requests), then --warmup requests on other media before each. Prompt "
    "tokens: usage.prompt_tokens; visual tokens: the change of the server's "
    "vllm_prumerge:visual_tokens_per_image (or _per_video) histogram over the run; peaks: "
    "sampled from /metrics. `stock`: its own server (no --plugin, same settings), first."
)


def start_and_measure(
    args: argparse.Namespace, model: str, configs: list[BenchConfig], *, stock: bool
) -> tuple[dict[str, Any], str, float]:
    """Start `vllm serve` (stock vLLM, or with the plugin), measure `configs` on it, stop it;
    (benchmark data, the server command, start-up seconds)."""
    from vllm_prumerge.encoder import PruMergeEncoder
    from vllm_prumerge.testing.server import serve

    dtype = (configs[0].name.partition(":")[2] or None) if stock else None
    # On top of this process's environment (use_cpu_if_no_gpu's settings).
    threads = {PruMergeEncoder.THREADS_ENV: str(args.tower_threads)}
    server_env = threads if args.tower_threads and not stock else {}
    cli = server_args(args, stock=stock, dtype=dtype)
    name = "server-" + configs[0].name.replace(":", "-") if stock else "server"
    log = Path(args.out) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with serve(model, cli, env=server_env, timeout=args.server_timeout, log_path=log) as base:
        started = time.perf_counter() - t0
        data = asyncio.run(benchmark(base, args, configs))
    prefix = "".join(f"{k}={v} " for k, v in server_env.items())
    return data, f"`{prefix}vllm serve MODEL {shlex.join(cli)}`", started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    everything = _cli.check_comparison(parser, args, stock_dtypes=True)
    if args.api_server_count < 1 or (args.tower_threads is not None and args.tower_threads < 1):
        parser.error("--api-server-count and --tower-threads must be >= 1")
    configs = [c for c in everything if not c.stock]
    stock_configs = [c for c in everything if c.stock]
    if stock_configs and args.base_url:
        parser.error("the stock configuration needs a server started by this script")
    args.chat_content_format = "the server's" if args.base_url else "openai"
    env, wall = _report.start_run()
    started: dict[str, float] = {}
    servers: dict[str, str] = {}
    if args.base_url:
        base = args.base_url.rstrip("/").removesuffix("/v1")
        data = asyncio.run(benchmark(base, args, configs))
        runs, model = data["runs"], args.model or data["served_model"]
        servers["plugin"] = f"given ({base})"
    else:
        model = _cli.checkpoint(args)[0]
        if args.frames:  # a template that drops video parts: vLLM's "string" content format
            args.chat_content_format = chat_prompt(model, args.frames).content_format
        runs = []
        # One server per stock dtype (`stock:DTYPE`), then the plugin's.
        groups = [(True, [c]) for c in stock_configs] + [(False, configs)] * bool(configs)
        for stock, group in groups:
            key = group[0].name if stock else "plugin"
            data, servers[key], started[key] = start_and_measure(args, model, group, stock=stock)
            runs += data["runs"]
    fill_stock_visual_tokens(runs)
    add_ratios(runs)
    result: dict[str, Any] = {
        "benchmark": "serving (vllm serve, OpenAI chat API, vllm bench serve)",
        "model": model if args.base_url else _cli.model_label(args),
        "model_path": model,
        "served_model": data["served_model"],
        "server": "; ".join(f"{k}: {v}" for k, v in servers.items()),
        "servers": servers,
        "server_startup_s": started,
        "bench_serve_command": data["bench_serve_command"],
        "settings": dict(vars(args)),
        "method": METHOD,
        "environment": env,
        "runs": runs,
    }
    plots = None if args.no_plots else plot
    return _report.finish(Path(args.out), "serving", result, wall, markdown_report, plots)


if __name__ == "__main__":
    main()
