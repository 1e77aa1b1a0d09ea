"""Offline throughput of LLaVA-family models in vLLM: stock token counts vs PruMerge, PruMerge+ and
fixed budgets, each against its text-only equivalent (text@CONFIG), in one offline engine
(`stock`: vLLM's own model, in a second one); each measured "engine" (pre-processed first, then
released at once) and "end to end" (as LLM.generate). Method: docs/benchmarks.md.

    python benchmarks/throughput.py --out out/throughput                   # generated checkpoint
    python benchmarks/throughput.py --family llava_next --image-size 672x672 --out out/next
    python benchmarks/throughput.py --family onevision --frames 8 --out out/video
    python benchmarks/throughput.py --model llava-hf/llava-1.5-7b-hf --out out/7b   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import _cli
import _report
from _common import (
    BenchConfig,
    chat_prompt,
    fair_settings,
    filler_token_id,
    modality,
    placeholder_token_id,
    rotated,
    summary,
    text_equivalent_ids,
    workloads,
)

from vllm_prumerge.testing.engine_args import add_engine_arguments

PHASES = ("engine", "end_to_end")
THROUGHPUT_KEYS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
PHASE_KEYS = (*THROUGHPUT_KEYS, "seconds", "peak_kv_cache_usage", "max_running_requests")
PHASE_KEYS += ("max_waiting_requests", "max_generating_requests", "preemptions")
RATIO_KEYS = (*THROUGHPUT_KEYS, "peak_kv_cache_usage", "max_running_requests")
RATIO_KEYS += ("max_generating_requests", "ttft_s_mean")
# The figures of a phase from the scheduler's per-step stats: JSON key -> StepTracker attribute.
TRACKED = {"peak_kv_cache_usage": "peak_kv_cache_usage", "max_running_requests": "max_running"}
TRACKED |= {"max_waiting_requests": "max_waiting", "max_generating_requests": "max_generating"}
TRACKED |= {"preemptions": "preemptions", "scheduler_steps": "steps"}
RATIOS = {"visual_tokens": "visual_tokens.mean", "frontend_ms_per_image": "frontend_ms_per_image"}


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.new_parser(__doc__, "Every configuration in one run; JSON, Markdown, PNG plots.")
    _cli.add_model_arguments(
        parser.add_argument_group("model"),
        "LLaVA-family checkpoint (hub id such as llava-hf/llava-1.5-7b-hf, or a local folder). "
        "Default: a generated random-weight checkpoint (see --synthetic, --family, --tower).",
    )
    work = parser.add_argument_group("workload")
    _cli.add_workload_arguments(work, "Seed of images, questions and engine.")
    _cli.add_comparison_arguments(
        work,
        stock="stock (vLLM's own model, tower in the engine, in a second engine)",
        repeats=3,
        pooling="figures are medians over repeats, every repeat is kept in the JSON",
    )
    add_engine_arguments(
        parser,
        kv_cache=True,
        title="engine (identical for every configuration)",
        target="vllm EngineArgs field",
    )
    _cli.add_output_arguments(
        parser,
        "out/throughput",
        "Folder for throughput.json, throughput.md and the PNG plots (created).",
        plots="PNG plots",
    )
    return parser


def run_settings(args: argparse.Namespace, model: str, *, stock: bool) -> dict[str, Any]:
    """The EngineArgs of this run: identical for every configuration but `stock`'s model."""
    from vllm_prumerge import engine_kwargs

    # The stat loggers feed StepTracker; the user's --engine-arg still wins.
    settings = {"model": model, "disable_log_stats": False, **fair_settings(args)}
    if not stock:  # the plugin's architecture and options, applied after any user overrides
        user = settings.pop("hf_overrides", None) or {}
        settings.update(engine_kwargs("prumerge", hf_overrides=user))
    return settings


def make_prompt(item: Any, config: BenchConfig) -> dict[str, Any]:
    """The offline request of a workload item in `config`: the token ids of the checkpoint's
    chat template applied to the message (what `vllm serve` sends its engine), and the media."""
    prompt: dict[str, Any] = {
        "prompt_token_ids": list(item.prompt_token_ids),
        "multi_modal_data": {item.modality: item.media},
    }
    if not config.stock:
        prompt["mm_processor_kwargs"] = {"prumerge": config.prumerge}
    return prompt


def render(engine: Any, prompt: dict[str, Any]) -> Any:
    """Pre-process one prompt as `LLM.generate` does (tokenizer, image processor and, with the
    plugin, the vision tower + reduction): an EngineInput ready for `add_request`."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    parsed = parse_model_prompt(engine.model_config, prompt)
    (engine_input,) = engine.renderer.render_cmpl([parsed], engine.renderer.default_cmpl_tok_params)
    return engine_input


def run(engine: Any, prompts: list, sampling: Any, tag: str, bar: Any, burst: bool = False):
    """Submit `prompts` and step the engine until every one finished.

    End to end (default): pre-process and submit one by one while the engine (another process)
    already runs the first ones, as `LLM.generate`. `burst`: pre-process all first, then release
    them at once: the LLM's prefill + decode alone, limited by the KV cache and max_num_seqs.
    Returns (outputs in order, seconds measured (burst: from the release), pre-processing s)."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    if burst:
        inputs = [render(engine, prompt) for prompt in prompts]
        rendered = time.perf_counter() - start
        start = time.perf_counter()
        for request_id, engine_input in zip(ids, inputs, strict=True):
            engine.add_request(request_id, engine_input, sampling, arrival_time=time.time())
    else:
        for request_id, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request_id, render(engine, prompt), sampling)
        rendered = time.perf_counter() - start
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
                bar.update(1)
    if missing := [i for i in ids if i not in done]:
        raise RuntimeError(f"{len(missing)} requests did not finish: {missing[:3]}")
    return [done[i] for i in ids], time.perf_counter() - start, rendered


def phase_figures(outputs: list[Any], seconds: float, tracker: Any) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "seconds": seconds,
        "requests_per_s": len(outputs) / seconds,
        "output_tokens_per_s": generated / seconds,
        "total_tokens_per_s": (prompt + generated) / seconds,
        **{key: getattr(tracker, attribute) for key, attribute in TRACKED.items()},
        "ttft_s": summary([o.metrics.first_token_latency for o in outputs if o.metrics]),
    }


def measure_phases(engine, tracker, prompts, sampling, tag, bar) -> tuple[dict, list, list]:
    """The end-to-end phase, then the engine-only (burst) phase, of the same prompts:
    (figures, outputs of the end-to-end phase, outputs of the engine phase)."""
    tracker.reset()
    e2e_outputs, seconds, submitted = run(engine, prompts, sampling, f"{tag}-e2e", bar)
    end_to_end = {**phase_figures(e2e_outputs, seconds, tracker), "submit_seconds": submitted}
    tracker.reset()
    outputs, seconds, rendered = run(engine, prompts, sampling, f"{tag}-eng", bar, burst=True)
    figures = {
        "engine": phase_figures(outputs, seconds, tracker),
        "end_to_end": end_to_end,
        "frontend_ms_per_image": 1e3 * rendered / len(prompts),
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "output_tokens": [len(o.outputs[0].token_ids) for o in outputs],
    }
    return figures, e2e_outputs, outputs


def measure(engine, tracker, items, config, sampling, image_token, filler, tag, bar) -> dict:
    """One repeat of `config` over `items`: both phases; then (`filler` given) both phases
    again for the text-equivalent prompts, built from the image requests' own prompt token ids
    (visual tokens replaced by `filler`)."""
    prompts = [make_prompt(item, config) for item in items]
    result, e2e_outputs, outputs = measure_phases(engine, tracker, prompts, sampling, tag, bar)
    visual = [o.prompt_token_ids.count(image_token) for o in outputs]
    if visual != [o.prompt_token_ids.count(image_token) for o in e2e_outputs]:
        raise RuntimeError(f"{config.name}: visual token counts differ between the two phases")
    result["visual_tokens"] = visual
    if filler is not None:
        ids = [text_equivalent_ids(o.prompt_token_ids, image_token, filler) for o in outputs]
        text_prompts = [{"prompt_token_ids": prompt_ids} for prompt_ids in ids]
        text, _, _ = measure_phases(engine, tracker, text_prompts, sampling, f"{tag}-text", bar)
        if text["prompt_tokens"] != result["prompt_tokens"]:
            raise RuntimeError(f"text@{config.name}: prompt lengths differ from the image prompts")
        result["text"] = text
    return result


def phase_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: the median over repeats of every figure."""
    result: dict[str, Any] = {}
    for phase in PHASES:
        result[phase] = {k: statistics.median(r[phase][k] for r in runs) for k in PHASE_KEYS}
        for stat in ("mean", "p50", "p90"):
            values = [r[phase]["ttft_s"][stat] for r in runs]
            result[phase][f"ttft_s_{stat}"] = statistics.median(values)
    return result


def without_token_lists(run: dict[str, Any]) -> dict[str, Any]:
    """A repeat's figures without its per-request token lists (kept once per configuration)."""
    kept = {k: v for k, v in run.items() if not k.endswith("_tokens")}
    return kept | ({"text": without_token_lists(run["text"])} if "text" in run else {})


def aggregate(config: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one configuration over its repeats (medians; token counts are identical).
    With text-equivalents: `text` holds their medians, `fraction_of_text` per phase the median
    over repeats of (image requests/s) / (text requests/s) of the same repeat."""
    first = runs[0]
    result: dict[str, Any] = {
        "name": config.name,
        "prumerge": config.prumerge,
        "num_requests": len(first["prompt_tokens"]),
        **{k: summary(first[k]) for k in ("visual_tokens", "prompt_tokens", "output_tokens")},
        "frontend_ms_per_image": statistics.median(r["frontend_ms_per_image"] for r in runs),
        **phase_medians(runs),
    }
    seconds = statistics.median(r["end_to_end"]["submit_seconds"] for r in runs)
    result["end_to_end"]["submit_seconds"] = seconds
    result["visual_tokens_per_request"] = first["visual_tokens"]
    if "text" in first:
        text_runs = [r["text"] for r in runs]
        result["text"] = {
            "prompt_tokens": summary(text_runs[0]["prompt_tokens"]),
            **phase_medians(text_runs),
        }
        result["fraction_of_text"] = {
            phase: statistics.median(
                r[phase]["requests_per_s"] / r["text"][phase]["requests_per_s"] for r in runs
            )
            for phase in PHASES
        }
        result["ttft_ratio_to_text"] = statistics.median(
            r["engine"]["ttft_s"]["mean"] / r["text"]["engine"]["ttft_s"]["mean"] for r in runs
        )
    result["runs"] = [without_token_lists(r) for r in runs]
    return result


def add_ratios(results: list[dict[str, Any]]) -> str:
    """Ratios of every configuration to the baseline (`_report.pick_baseline`) and the ideal
    ratios; returns the baseline's name. Ideal: cost per request proportional to its prompt
    tokens P, so requests/s and output tokens/s scale by P_base / P, total tokens/s by
    P_base / P * (P + O) / (P_base + O_base) (O = mean output tokens)."""
    base = _report.pick_baseline(results)
    p_base, o_base = base["prompt_tokens"]["mean"], base["output_tokens"]["mean"]
    for r in results:
        p, o = r["prompt_tokens"]["mean"], r["output_tokens"]["mean"]
        speedup = p_base / p
        r["ideal_ratio_to_baseline"] = {
            "requests_per_s": speedup,
            "output_tokens_per_s": speedup,
            "total_tokens_per_s": speedup * (p + o) / (p_base + o_base),
        }
        ratios: dict[str, Any] = {"prompt_tokens": p / p_base, **_report.ratios(r, base, RATIOS)}
        for phase in PHASES:
            ratios[phase] = {k: _report.ratio(r[phase][k], base[phase][k]) for k in RATIO_KEYS}
        r["ratio_to_baseline"] = ratios
        r["fraction_of_ideal"] = {p: ratios[p]["requests_per_s"] / speedup for p in PHASES}
    return base["name"]


def markdown_report(data: dict[str, Any]) -> str:
    results, settings = data["results"], data["settings"]
    short, long = _report.media_labels(settings)
    x = "ratio_to_baseline."
    visual = [(f"visual tok/{short} mean", "visual_tokens.mean")]
    visual += [(stat, f"visual_tokens.{stat}") for stat in ("p50", "p95", "min", "max")]
    tokens = [("config", "name"), *visual, ("prompt tok mean", "prompt_tokens.mean")]
    tokens.append(("prompt x", x + "prompt_tokens"))
    ideal = ("prompt-ratio ideal x", "ideal_ratio_to_baseline.requests_per_s")
    throughput = [
        ("config", "name"),
        ("engine req/s", "engine.requests_per_s"),
        ("x", x + "engine.requests_per_s"),
        ideal,
        ("of ideal", "fraction_of_ideal.engine"),
        ("out tok/s", "engine.output_tokens_per_s"),
        ("x", x + "engine.output_tokens_per_s"),
        ("total tok/s", "engine.total_tokens_per_s"),
        ("x", x + "engine.total_tokens_per_s"),
        ("prompt-ratio ideal x", "ideal_ratio_to_baseline.total_tokens_per_s"),
        ("peak KV %", lambda r: 100 * r["engine"]["peak_kv_cache_usage"]),
        ("max concurrent", "engine.max_generating_requests"),
        ("x", x + "engine.max_generating_requests"),
        ("preempt", "engine.preemptions"),
        ("burst TTFT s", "engine.ttft_s_mean"),
        ("x", x + "engine.ttft_s_mean"),
        ("e2e req/s", "end_to_end.requests_per_s"),
        ("x", x + "end_to_end.requests_per_s"),
        (f"front-end ms/{short}", "frontend_ms_per_image"),
    ]
    text = [
        ("config", "name"),
        (f"visual tok/{short}", "visual_tokens.mean"),
        ("prompt tok", "prompt_tokens.mean"),
        ("engine req/s", "engine.requests_per_s"),
        ("text-equiv. req/s", "text.engine.requests_per_s"),
        ("of text", "fraction_of_text.engine"),
        ("x off", x + "engine.requests_per_s"),
        ideal,
        ("burst TTFT s", "engine.ttft_s_mean"),
        ("text TTFT s", "text.engine.ttft_s_mean"),
        ("e2e req/s", "end_to_end.requests_per_s"),
        ("text e2e req/s", "text.end_to_end.requests_per_s"),
        ("e2e of text", "fraction_of_text.end_to_end"),
    ]
    text_intro = (
        "`text@CONFIG`: each request's own prompt with its visual tokens replaced by a text "
        "token, measured right after the image requests in every repeat. `of text` = image "
        "req/s / text req/s (median of the same-repeat ratios): 1.0 = the images cost nothing "
        "beyond their tokens. `x off` = ratio to the baseline's image req/s."
    )
    lines = [
        f"# Throughput: visual tokens per {long} vs serving cost (vLLM offline)",
        "",
        *_report.video_note(settings),
        f"Model: `{data['model']}`, dtype {'/'.join(sorted(set(data['dtype'].values())))}; "
        f"{settings['num_prompts']} requests per configuration, {settings['output_len']} output "
        f"tokens each; KV cache {settings['kv_cache_tokens'] or 'sized by vLLM'} tokens, "
        f"max_num_seqs {settings['max_num_seqs']}; {_report.device_line(data['environment'])}; "
        f"{settings['repeats']} repeat(s), medians.",
        "",
        f"{_report.BASELINE_RULE} Here: `{data['baseline']}`. Prompt-ratio ideal x = P_base / P, "
        "the ratio if cost were proportional to prompt tokens (decode steps do not shrink with "
        "the prompt: no engine reaches it). `engine`: requests pre-processed first, then "
        "released at once (LLM prefill + decode only); `e2e`: pre-processing (tokenizer, image "
        "processor, tower + reduction) and submission one by one while the engine runs.",
        "",
        *_report.text_section(results, text_intro, text),
        "## Tokens per request",
        "",
        _report.table(results, tokens),
        "## Throughput and concurrency",
        "",
        _report.table(results, throughput),
        "`of ideal` = engine req/s ratio / prompt-ratio ideal. Engine phase: `peak KV %`, `max "
        "concurrent` (most requests that produced a token in one step; the JSON also has the "
        "scheduler's running count), `preempt` (preemptions), `burst TTFT` (mean time to first "
        f"token). `front-end ms/{short}` = pre-processing time per request at batch 1.",
        "",
        "Method: " + data["method"],
        "",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """throughput_vs_tokens.png, scaling.png and visual_tokens_hist.png in `out`."""
    plt = _report.pyplot()
    results, settings = data["results"], data["settings"]
    long = _report.media_labels(settings)[1]
    title = _report.plot_title(data, f"{settings['output_len']} output tokens")
    base = next(r for r in results if r["name"] == data["baseline"])
    text_tokens = base["prompt_tokens"]["mean"] - base["visual_tokens"]["mean"]
    xs = [r["visual_tokens"]["mean"] for r in results]
    top = max(*xs, base["visual_tokens"]["mean"] + 1)
    grid = [1 + i * (top - 1) / 400 for i in range(401)]

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.5, 5))
    for phase, colour, label in (("engine", "C0", "engine"), ("end_to_end", "C1", "end to end")):
        rate = base[phase]["requests_per_s"] * base["prompt_tokens"]["mean"]
        ideal = [rate / (text_tokens + v) for v in grid]
        ax.plot(grid, ideal, "--", color=colour, alpha=0.6, label=f"prompt-ratio ideal, {label}")
        measured = [r[phase]["requests_per_s"] for r in results]
        ax.scatter(xs, measured, color=colour, zorder=3, label=f"measured {label}")
    _report.label_points(ax, results, xs, [r["engine"]["requests_per_s"] for r in results], 8)
    ax.set(ylabel="requests / s", title="Throughput vs visual tokens")
    generating = [r["engine"]["max_generating_requests"] for r in results]
    ax2.scatter(xs, generating, color="C2", label="most requests generating at once")
    kv = [100 * r["engine"]["peak_kv_cache_usage"] for r in results]
    ax2.scatter(xs, kv, color="C3", marker="x", label="peak KV-cache usage (%)")
    _report.label_points(ax2, results, xs, generating, 8)
    cache = settings["kv_cache_tokens"]
    ax2.set_title(f"Concurrency in a {cache}-token KV cache" if cache else "Concurrency")
    for axis in (ax, ax2):
        _report.token_axis(axis, top, long, legend=7)
    names = [_report.save_figure(fig, out, "throughput_vs_tokens.png", title)]

    ordered = sorted(results, key=lambda r: r["visual_tokens"]["mean"])
    xs = [r["visual_tokens"]["mean"] for r in ordered]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for axis, key, name in (
        (axes[0], "requests_per_s", "engine requests / s"),
        (axes[1], "ttft_s_mean", "time to first token, all requests at once (s)"),
    ):
        ys = [r["engine"][key] for r in ordered]
        axis.plot(xs, ys, "o-", color="C0", label="image requests")
        if texts := [r for r in ordered if "text" in r]:
            text_xs = [r["visual_tokens"]["mean"] for r in texts]
            text_ys = [r["text"]["engine"][key] for r in texts]
            label = "text-equivalent (same prompt length, text only)"
            axis.plot(text_xs, text_ys, "s--", color="C2", label=label)
        _report.label_points(axis, ordered, xs, ys)
        _report.token_axis(axis, max(xs), long, legend=7)
        axis.set_title(name)
    names.append(_report.save_figure(fig, out, "scaling.png", title + ", released at once"))

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    shown = [r for r in results if r["name"] in ("prumerge", "prumerge+")] or results
    counts = [c for r in shown for c in r["visual_tokens_per_request"]]
    width = max(1, (max(counts) + 10) // 60)
    bins = list(range(0, max(counts) + 2 * width, width))
    for i, r in enumerate(shown):
        v = r["visual_tokens"]
        label = f"{r['name']} (mean {v['mean']:.1f}, p50 {v['p50']:.0f}, max {v['max']:.0f})"
        ax.hist(r["visual_tokens_per_request"], bins=bins, alpha=0.6, color=f"C{i}", label=label)
    ax.set_xlabel(f"visual tokens per {long} (kept + 1 extra token per image, crop or frame)")
    ax.set(ylabel=f"{long}s", title=f"Adaptive token counts per {long}")
    ax.legend(fontsize=8)
    return [*names, _report.save_figure(fig, out, "visual_tokens_hist.png")]


METHOD = (
    "One vLLM engine (identical settings) serves every plugin configuration through "
    "per-request mm_processor_kwargs; no prefix or multimodal processor cache; fixed output "
    "length (ignore_eos, greedy). Prompts: the checkpoint's chat template applied to one user "
    "message (media, then question), as vllm serve builds them. A first round of every "
    "configuration, then --warmup requests on other media before each; order rotated per "
    "repeat. Visual tokens: the placeholder id counted in RequestOutput.prompt_token_ids; KV "
    "usage, running requests and preemptions: the scheduler's per-step stats."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    configs = _cli.check_comparison(parser, args, stock_dtypes=False)
    env, wall_start = _report.start_run()
    model, spec = _cli.checkpoint(args)
    image_token = placeholder_token_id(model, args.frames)
    chat = chat_prompt(model, args.frames)
    args.chat_content_format = chat.content_format  # "string": the template drops video parts
    warm_per_round = max(args.warmup, 1)
    warm_count = warm_per_round * len(configs) * (args.repeats + 1)
    items, warm_items = workloads(args, warm_count, prompt=chat)
    warm = iter(warm_items)
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm_prumerge.serving.stats import StepTracker, stat_logger_factory

    sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    tracker = StepTracker()
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    settings_used: dict[str, Any] = {}
    startup: dict[str, float] = {}
    resolved_dtype: dict[str, str] = {}
    filler = filler_token_id(AutoTokenizer.from_pretrained(model)) if args.text else None

    def warm_up(engine: Any, config: BenchConfig, count: int, tag: str) -> None:
        prompts = [make_prompt(next(warm), config) for _ in range(count)]
        run(engine, prompts, sampling, f"warm-{config.name}-{tag}", _report.progress(0, "", True))

    total = (4 if args.text else 2) * len(configs) * args.repeats * args.num_prompts
    with _report.progress(total, "throughput", disable=args.no_progress) as bar:
        for key in ("plugin", "stock"):
            if not (group := [c for c in configs if c.stock == (key == "stock")]):
                continue
            settings_used[key] = run_settings(args, model, stock=key == "stock")
            bar.set_description(f"starting {key} engine")
            t0 = time.perf_counter()
            engine = LLMEngine.from_engine_args(
                EngineArgs(**settings_used[key]), stat_loggers=[stat_logger_factory(tracker)]
            )
            startup[key] = time.perf_counter() - t0
            resolved_dtype[key] = str(engine.model_config.dtype).removeprefix("torch.")
            try:
                bar.set_description("warm-up")
                for config in group:  # load the tower, touch every configuration's code path
                    warm_up(engine, config, warm_per_round, "first")
                for repeat in range(args.repeats):
                    for config in rotated(group, repeat):
                        if args.warmup:
                            bar.set_description(f"{config.name} (warm-up)")
                            warm_up(engine, config, args.warmup, str(repeat))
                        bar.set_description(config.name)
                        tag = f"{config.name}-{repeat}"
                        result = measure(
                            engine, tracker, items, config, sampling, image_token, filler, tag, bar
                        )
                        runs[config.name].append(result)
                        visual = sum(result["visual_tokens"]) / len(items)
                        rate = result["engine"]["requests_per_s"]
                        bar.set_postfix_str(
                            f"{config.name}: {rate:.2f} req/s, {visual:.1f} visual tok"
                        )
            finally:
                engine.engine_core.shutdown()
                del engine
                gc.collect()

    results = [aggregate(c, runs[c.name]) for c in configs]
    media = {"modality": modality(args.frames), "frames": args.frames}
    media["video_kind"] = args.video_kind if args.frames else None
    data: dict[str, Any] = {
        "benchmark": "throughput (vLLM offline)",
        "model": _cli.model_label(args),
        "model_path": model,
        "synthetic_spec": spec,
        "image_token_id": image_token,  # the placeholder counted (video_token_index: videos)
        "media": {**media, "chat_content_format": chat.content_format},
        "settings": dict(vars(args)),
        "engine_settings": settings_used,
        "engine_startup_s": startup,
        "dtype": resolved_dtype,
        "method": METHOD,
        "baseline": add_ratios(results),
        "environment": env,
        "results": results,
    }
    plots = None if args.no_plots else plot
    return _report.finish(Path(args.out), "throughput", data, wall_start, markdown_report, plots)


if __name__ == "__main__":
    main()
