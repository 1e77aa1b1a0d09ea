"""Offline throughput of LLaVA-family models in vLLM: stock token counts vs PruMerge, PruMerge+,
fixed budgets, each against its text-only equivalent.

One workload (N image + question prompts, fixed seed, fixed output length) runs through vLLM's
offline engine in every configuration, all in one run on one machine, and every figure is
measured: requests/s, output and total tokens/s, prompt and visual tokens per image (mean, p50,
p95, min, max), peak KV-cache usage, the most requests generating at once, preemptions and
time to first token, each with its ratio to `off` (the stock count: 576 for LLaVA-1.5, 729 for
SigLIP, base + tiles for LLaVA-NeXT) and the prompt-ratio ideal (the ratio if cost were
proportional to prompt tokens).

Videos (`--frames N`, on a checkpoint that takes videos: LLaVA-OneVision, LLaVA-NeXT-Video): every
request sends one N-frame video instead of the image (`multi_modal_data={"video": frames}`), and
every count is per video: `off` is the family's stock count, the reduced configurations reduce
each frame on its own (sum over frames of kept + 1).

The true limit: every configuration is also measured as text only ("text@CONFIG": each request's
prompt with its visual tokens replaced by an ordinary text token, so it has exactly the image
prompt's length; same output length, same engine). `of text` = image throughput / text
throughput: 1.0 means the images cost nothing beyond their tokens.

Each configuration is measured twice per repeat: "engine" (every request pre-processed first,
then all released at once: the LLM's prefill + decode cost, limited by the KV cache) and
"end to end" (pre-processing, i.e. tokenizer, image processor, CLIP tower and reduction in this
process, interleaved with submission while the engine runs, as `LLM.generate` does).

How the configurations are made comparable: one engine (`--plugin prumerge`'s architecture,
identical engine settings) serves every configuration through per-request
`mm_processor_kwargs={"prumerge": ...}`; prefix caching and the multimodal processor cache are
off, so every request pays for its image (CLIP tower + reduction in the front end, prefill and
decode in the engine); each configuration is preceded by warm-up requests on other images; the
KV cache has a fixed size (`--kv-cache-tokens`) so that the concurrency limit is visible; output
length is fixed (`ignore_eos`). The optional `stock` configuration runs vLLM's own LLaVA (tower in
the engine) in a second engine with the same settings.

    python benchmarks/throughput.py --out out/throughput                   # generated checkpoint
    python benchmarks/throughput.py --family llava_next --image-size 672x672 --out out/next
    python benchmarks/throughput.py --family onevision --frames 8 --out out/video
    python benchmarks/throughput.py --model llava-hf/llava-1.5-7b-hf --out out/7b   # on a GPU

Writes OUT/throughput.json (every figure, per-request counts, environment), OUT/throughput.md
(tables), OUT/throughput_vs_tokens.png, OUT/scaling.png (requests/s and TTFT against visual
tokens per image, with the text-equivalent line) and OUT/visual_tokens_hist.png.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

from _cli import (
    add_model_arguments,
    add_output_arguments,
    add_workload_arguments,
    model_label,
    new_parser,
)
from _common import (
    BenchConfig,
    WorkItem,
    build_workload,
    chat_prompt,
    default_configs,
    filler_token_id,
    modality,
    parse_configs,
    placeholder_token_id,
    summary,
    synthetic_checkpoint,
    text_equivalent_ids,
)
from _report import (
    BASELINE_RULE,
    device_line,
    environment,
    finish,
    label_points,
    media_labels,
    pick_baseline,
    progress,
    pyplot,
    ratio,
    save_figure,
    table,
    text_section,
    token_axis,
    video_note,
)

from vllm_prumerge.serving.stats import StepTracker, stat_logger_factory
from vllm_prumerge.testing.engine_args import (
    add_engine_arguments,
    engine_settings,
    use_cpu_if_no_gpu,
)

STOCK = "stock"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        __doc__,
        "Runs every configuration in one run and writes JSON, Markdown and PNG plots.",
    )
    model = parser.add_argument_group("model")
    add_model_arguments(
        model,
        "LLaVA-1.5, LLaVA-NeXT, SigLIP-LLaVA, LLaVA-OneVision or LLaVA-NeXT-Video "
        "checkpoint (hub id such as "
        "llava-hf/llava-1.5-7b-hf, or a local folder). Default: a generated random-weight "
        "checkpoint (see --synthetic, --family, --tower).",
    )
    work = parser.add_argument_group("workload")
    add_workload_arguments(work, "Seed of images, questions and engine.")
    work.add_argument(
        "--text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure every configuration's text-equivalent (text@CONFIG: the same "
        "prompts with every visual token replaced by a text token; same length, same output, "
        "same engine), the limit an image request can reach.",
    )
    work.add_argument(
        "--configs",
        default=None,
        help="Comma-separated configurations: off (stock 576 tokens through the plugin's code "
        "path), prumerge, prumerge+, fixed:N (keep N patches + 1 extra token), fixed:Ns (with "
        "PruMerge+ spatial samples), fixed:RATIO (e.g. fixed:0.25), and stock (vLLM's own LLaVA "
        "in a second engine; costs one more engine start); videos: a reducing one followed by "
        "/evs[:RATE] or /adaptive[:THRESHOLD] (e.g. prumerge+/adaptive) reduces across time "
        f"first. {BASELINE_RULE} Default: "
        f"{default_configs(0)}; with --frames: {default_configs(1)} (budgets per frame).",
    )
    work.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="Warm-up requests per configuration (on other images), run and discarded right "
        "before its measured requests; one more round of every configuration precedes all.",
    )
    work.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Measure every configuration this many times (order rotated each round); figures "
        "are the median over repeats, every repeat is kept in the JSON.",
    )
    add_engine_arguments(
        parser,
        kv_cache=True,
        title="engine (identical for every configuration)",
        target="vllm EngineArgs field",
    )
    add_output_arguments(
        parser,
        "out/throughput",
        "Folder for throughput.json, throughput.md and the PNG plots (created).",
        plots="PNG plots",
    )
    return parser


# --------------------------------------------------------------------------------------------
# Engine


def run_settings(args: argparse.Namespace, model: str, *, stock: bool) -> dict[str, Any]:
    """The EngineArgs fields of this run (identical for every configuration but `stock`'s
    architecture)."""
    from vllm_prumerge import engine_kwargs

    settings: dict[str, Any] = {
        "model": model,
        "seed": args.seed,
        "limit_mm_per_prompt": {modality(args.frames): 1},
        "enable_prefix_caching": False,  # every request pays for its whole prompt
        "mm_processor_cache_gb": 0,  # every request pays for its image (tower + reduction)
        "disable_log_stats": False,  # the stat loggers feed StepTracker
        **engine_settings(args),  # --engine-arg last: it overrides any of these
    }
    if not stock:  # the plugin's architecture and options, applied after any user overrides
        user = settings.pop("hf_overrides", None) or {}
        settings.update(engine_kwargs("prumerge", hf_overrides=user))
    return settings


def start_engine(settings: dict[str, Any], tracker: StepTracker) -> Any:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(
        EngineArgs(**settings), stat_loggers=[stat_logger_factory(tracker)]
    )


def stop_engine(engine: Any) -> None:
    engine.engine_core.shutdown()
    del engine
    gc.collect()


# --------------------------------------------------------------------------------------------
# Runs


def make_prompt(item: WorkItem, config: BenchConfig) -> dict[str, Any]:
    """The offline request of `item` in `config`: the token ids of the chat prompt that the
    checkpoint's own template renders (what `vllm serve` sends its engine) and the image or
    video."""
    if item.prompt_token_ids is None:
        raise ValueError("build the workload with a ChatPrompt: the item has no prompt ids")
    prompt: dict[str, Any] = {
        "prompt_token_ids": list(item.prompt_token_ids),
        "multi_modal_data": {item.modality: item.media},
    }
    if config.name != STOCK:
        prompt["mm_processor_kwargs"] = {"prumerge": config.prumerge}
    return prompt


def render(engine: Any, prompt: dict[str, Any]) -> Any:
    """Pre-process one prompt as `LLM.generate` does (tokenizer, image processor and, with the
    plugin, the vision tower + reduction): an EngineInput ready for `add_request`."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    renderer = engine.renderer
    parsed = parse_model_prompt(engine.model_config, prompt)
    (engine_input,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
    return engine_input


def drain(engine: Any, ids: list[str], bar: Any) -> list[Any]:
    """Step the engine until it is idle; the finished outputs of `ids`, in that order."""
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
                bar.update(1)
    missing = [i for i in ids if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} requests did not finish: {missing[:3]}")
    return [done[i] for i in ids]


def run_end_to_end(
    engine: Any, prompts: list[dict[str, Any]], sampling: Any, tag: str, bar: Any
) -> tuple[list[Any], float, float]:
    """Pre-process and submit the requests one after another (as `LLM.generate`), while the
    engine core (another process) already runs the first ones; step until all finish.

    Returns (outputs, seconds from the first pre-processing to the last output, seconds spent
    pre-processing and submitting)."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, render(engine, prompt), sampling)
    submitted = time.perf_counter() - start
    outputs = drain(engine, ids, bar)
    return outputs, time.perf_counter() - start, submitted


def run_engine_only(
    engine: Any, prompts: list[dict[str, Any]], sampling: Any, tag: str, bar: Any
) -> tuple[list[Any], float, float]:
    """Pre-process every request first, then release them all at once and step until done:
    the LLM's cost alone (prefill + decode), limited only by the KV cache and max_num_seqs.

    Returns (outputs, engine seconds (release to last output), pre-processing seconds)."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    inputs = [render(engine, prompt) for prompt in prompts]
    rendered = time.perf_counter() - start
    start = time.perf_counter()
    for request_id, engine_input in zip(ids, inputs, strict=True):
        engine.add_request(request_id, engine_input, sampling, arrival_time=time.time())
    outputs = drain(engine, ids, bar)
    return outputs, time.perf_counter() - start, rendered


def phase_figures(outputs: list[Any], seconds: float, tracker: StepTracker) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
    return {
        "seconds": seconds,
        "requests_per_s": len(outputs) / seconds,
        "output_tokens_per_s": generated / seconds,
        "total_tokens_per_s": (prompt + generated) / seconds,
        "peak_kv_cache_usage": tracker.peak_kv_cache_usage,
        "max_running_requests": tracker.max_running,
        "max_waiting_requests": tracker.max_waiting,
        "max_generating_requests": tracker.max_generating,
        "preemptions": tracker.preemptions,
        "scheduler_steps": tracker.steps,
        "ttft_s": summary(ttft),
    }


def measure_phases(
    engine: Any,
    tracker: StepTracker,
    prompts: list[dict[str, Any]],
    sampling: Any,
    tag: str,
    bar: Any,
) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """The end-to-end phase, then the engine-only phase, of the same prompts: (figures, outputs
    of the end-to-end phase, outputs of the engine phase)."""
    tracker.reset()
    e2e_outputs, seconds, submitted = run_end_to_end(engine, prompts, sampling, f"{tag}-e2e", bar)
    end_to_end = {**phase_figures(e2e_outputs, seconds, tracker), "submit_seconds": submitted}
    tracker.reset()
    outputs, seconds, rendered = run_engine_only(engine, prompts, sampling, f"{tag}-eng", bar)
    figures = {
        "engine": phase_figures(outputs, seconds, tracker),
        "end_to_end": end_to_end,
        "frontend_ms_per_image": 1e3 * rendered / len(prompts),
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "output_tokens": [len(o.outputs[0].token_ids) for o in outputs],
    }
    return figures, e2e_outputs, outputs


def measure(
    engine: Any,
    tracker: StepTracker,
    items: list[WorkItem],
    config: BenchConfig,
    sampling: Any,
    image_token: int,
    filler: int | None,
    tag: str,
    bar: Any,
) -> dict[str, Any]:
    """One repeat of `config` over `items`: the end-to-end phase, then the engine-only phase;
    then (`filler` given) both phases again for the text-equivalent prompts, built from the
    image requests' own prompt token ids (visual tokens replaced by `filler`)."""
    prompts = [make_prompt(item, config) for item in items]
    result, e2e_outputs, outputs = measure_phases(engine, tracker, prompts, sampling, tag, bar)
    visual = [o.prompt_token_ids.count(image_token) for o in outputs]
    if visual != [o.prompt_token_ids.count(image_token) for o in e2e_outputs]:
        raise RuntimeError(f"{config.name}: visual token counts differ between the two phases")
    result["visual_tokens"] = visual
    if filler is not None:
        text_prompts = [
            {"prompt_token_ids": text_equivalent_ids(o.prompt_token_ids, image_token, filler)}
            for o in outputs
        ]
        text, _, _ = measure_phases(engine, tracker, text_prompts, sampling, f"{tag}-text", bar)
        if text["prompt_tokens"] != result["prompt_tokens"]:
            raise RuntimeError(f"text@{config.name}: prompt lengths differ from the image prompts")
        result["text"] = text
    return result


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


PHASES = ("engine", "end_to_end")
THROUGHPUT_KEYS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
PHASE_KEYS = (
    *THROUGHPUT_KEYS,
    "seconds",
    "peak_kv_cache_usage",
    "max_running_requests",
    "max_waiting_requests",
    "max_generating_requests",
    "preemptions",
)


def phase_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: the median over repeats of every figure."""
    result: dict[str, Any] = {}
    for phase in PHASES:
        result[phase] = {key: median([r[phase][key] for r in runs]) for key in PHASE_KEYS}
        for stat in ("mean", "p50", "p90"):
            result[phase][f"ttft_s_{stat}"] = median([r[phase]["ttft_s"][stat] for r in runs])
    return result


def without_token_lists(run: dict[str, Any]) -> dict[str, Any]:
    """A repeat's figures without its per-request token lists (kept once per configuration)."""
    return {
        k: without_token_lists(v) if isinstance(v, dict) and k == "text" else v
        for k, v in run.items()
        if not k.endswith("_tokens")
    }


def aggregate(config: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one configuration over its repeats (medians; token counts are identical).

    With text-equivalents: `text` holds their medians and `fraction_of_text` the median over
    repeats of (image requests/s) / (text requests/s) of the same repeat, per phase."""
    first = runs[0]
    result: dict[str, Any] = {
        "name": config.name,
        "prumerge": None if config.name == STOCK else config.prumerge,
        "num_requests": len(first["prompt_tokens"]),
        "visual_tokens": summary(first["visual_tokens"]),
        "prompt_tokens": summary(first["prompt_tokens"]),
        "output_tokens": summary(first["output_tokens"]),
        "frontend_ms_per_image": median([r["frontend_ms_per_image"] for r in runs]),
    }
    result.update(phase_medians(runs))
    result["end_to_end"]["submit_seconds"] = median(
        [r["end_to_end"]["submit_seconds"] for r in runs]
    )
    result["visual_tokens_per_request"] = first["visual_tokens"]
    if "text" in first:
        text_runs = [r["text"] for r in runs]
        result["text"] = {
            "prompt_tokens": summary(text_runs[0]["prompt_tokens"]),
            **phase_medians(text_runs),
        }
        result["fraction_of_text"] = {
            phase: median(
                [r[phase]["requests_per_s"] / r["text"][phase]["requests_per_s"] for r in runs]
            )
            for phase in PHASES
        }
        result["ttft_ratio_to_text"] = median(
            [r["engine"]["ttft_s"]["mean"] / r["text"]["engine"]["ttft_s"]["mean"] for r in runs]
        )
    result["runs"] = [without_token_lists(r) for r in runs]
    return result


def add_ratios(results: list[dict[str, Any]]) -> str:
    """Ratios of every configuration to the baseline (`_report.pick_baseline`) and the ideal
    ratios; returns the baseline's name.

    Ideal: cost per request proportional to its prompt tokens, so requests/s and output
    tokens/s scale by P_base / P (P = mean prompt tokens) and total tokens/s by
    P_base / P * (P + O) / (P_base + O) (O = mean output tokens).
    """
    base = pick_baseline(results)
    p_base, o_base = base["prompt_tokens"]["mean"], base["output_tokens"]["mean"]
    keys = (*THROUGHPUT_KEYS, "peak_kv_cache_usage", "max_running_requests")
    keys += ("max_generating_requests", "ttft_s_mean")
    for r in results:
        p, o = r["prompt_tokens"]["mean"], r["output_tokens"]["mean"]
        speedup = p_base / p
        r["ideal_ratio_to_baseline"] = {
            "requests_per_s": speedup,
            "output_tokens_per_s": speedup,
            "total_tokens_per_s": speedup * (p + o) / (p_base + o_base),
        }
        ratios: dict[str, Any] = {
            "prompt_tokens": p / p_base,
            "visual_tokens": ratio(r["visual_tokens"]["mean"], base["visual_tokens"]["mean"]),
            "frontend_ms_per_image": ratio(
                r["frontend_ms_per_image"], base["frontend_ms_per_image"]
            ),
        }
        for phase in PHASES:
            ratios[phase] = {key: ratio(r[phase][key], base[phase][key]) for key in keys}
        r["ratio_to_baseline"] = ratios
        r["fraction_of_ideal"] = {
            phase: ratios[phase]["requests_per_s"] / speedup for phase in PHASES
        }
    return base["name"]


# --------------------------------------------------------------------------------------------
# Reports


def markdown_report(data: dict[str, Any]) -> str:
    results, env, settings = data["results"], data["environment"], data["settings"]
    short, long = media_labels(settings)
    x = "ratio_to_baseline."
    tokens = [
        ("config", "name"),
        (f"visual tok/{short} mean", "visual_tokens.mean"),
        *[(stat, f"visual_tokens.{stat}") for stat in ("p50", "p95", "min", "max")],
        ("prompt tok mean", "prompt_tokens.mean"),
        ("prompt x", x + "prompt_tokens"),
    ]
    throughput = [
        ("config", "name"),
        ("engine req/s", "engine.requests_per_s"),
        ("x", x + "engine.requests_per_s"),
        ("prompt-ratio ideal x", "ideal_ratio_to_baseline.requests_per_s"),
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
        ("prompt-ratio ideal x", "ideal_ratio_to_baseline.requests_per_s"),
        ("burst TTFT s", "engine.ttft_s_mean"),
        ("text TTFT s", "text.engine.ttft_s_mean"),
        ("e2e req/s", "end_to_end.requests_per_s"),
        ("text e2e req/s", "text.end_to_end.requests_per_s"),
        ("e2e of text", "fraction_of_text.end_to_end"),
    ]
    text_intro = (
        "`text@CONFIG`: each request's own prompt with its visual tokens replaced by a text "
        "token (same length and layout, same output length, same engine), measured right after "
        "the image requests in every repeat. `of text` = image req/s / text req/s (median over "
        "repeats of the same-repeat ratio): 1.0 = the images cost nothing beyond their tokens. "
        "`x off` = ratio to the baseline's image req/s."
    )
    lines = [
        f"# Throughput: visual tokens per {long} vs serving cost (vLLM offline)",
        "",
        *video_note(settings),
        f"Model: `{data['model']}`, dtype {'/'.join(sorted(set(data['dtype'].values())))}; "
        f"{settings['num_prompts']} requests "
        f"per configuration, {settings['output_len']} output tokens each; KV cache "
        f"{settings['kv_cache_tokens'] or 'sized by vLLM'} tokens, max_num_seqs "
        f"{settings['max_num_seqs']}; {device_line(env)}; {settings['repeats']} repeat(s), "
        "medians.",
        "",
        f"{BASELINE_RULE} Here: `{data['baseline']}`. Prompt-ratio ideal x = the ratio if cost "
        "were proportional to prompt tokens (P_base / P); no engine reaches it, since decode "
        "steps do not shrink with the prompt. `engine`: requests pre-processed first, then "
        "released at once (LLM prefill + decode only, limited by the KV cache); `e2e`: "
        "pre-processing (tokenizer, image processor, vision tower + reduction, in the front-end "
        "process) and submission one by one while the engine runs, as `LLM.generate`.",
        "",
        *text_section(results, text_intro, text),
        "## Tokens per request",
        "",
        table(results, tokens),
        "## Throughput and concurrency",
        "",
        table(results, throughput),
        "`of ideal` = measured engine req/s ratio / prompt-ratio ideal. `peak KV %`, "
        "`max concurrent` (most requests that produced a token in one engine step) and "
        "`preempt` (preemptions) "
        "are from the engine phase; the JSON also has the scheduler's running count, which "
        "includes partially prefilled requests. `burst TTFT` = mean time to first token when "
        f"all requests arrive at once (engine phase). `front-end ms/{short}` = pre-processing "
        "time per request at batch 1 (tokenizer, image processor, vision tower and reduction).",
        "",
        "Method: " + data["method"],
        "",
    ]
    return "\n".join(lines)


def plot_scaling(data: dict[str, Any], out: Path) -> str:
    """scaling.png: engine requests/s and burst TTFT against visual tokens per image, image
    requests and their text-equivalents; returns the file name."""
    plt = pyplot()

    results = sorted(data["results"], key=lambda r: r["visual_tokens"]["mean"])
    xs = [r["visual_tokens"]["mean"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for ax, key, title in (
        (axes[0], "requests_per_s", "engine requests / s"),
        (axes[1], "ttft_s_mean", "time to first token, all requests at once (s)"),
    ):
        ax.plot(xs, [r["engine"][key] for r in results], "o-", color="C0", label="image requests")
        texts = [r for r in results if "text" in r]
        if texts:
            ax.plot(
                [r["visual_tokens"]["mean"] for r in texts],
                [r["text"]["engine"][key] for r in texts],
                "s--",
                color="C2",
                label="text-equivalent (same prompt length, text only)",
            )
        label_points(ax, results, xs, [r["engine"][key] for r in results])
        token_axis(ax, max(xs), media_labels(data["settings"])[1])
        ax.set_title(title)
        ax.legend(fontsize=7)
    title = (
        f"{data['model']}: {data['settings']['num_prompts']} requests released at once, "
        f"{data['settings']['output_len']} output tokens; "
        f"{data['environment'].get('gpu') or data['environment']['cpu']}"
    )
    return save_figure(fig, out, "scaling.png", title)


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """throughput_vs_tokens.png, scaling.png and visual_tokens_hist.png in `out`; returns the
    file names."""
    plt = pyplot()

    results = data["results"]
    base = next(r for r in results if r["name"] == data["baseline"])
    text_tokens = base["prompt_tokens"]["mean"] - base["visual_tokens"]["mean"]
    xs = [r["visual_tokens"]["mean"] for r in results]
    top = max(*xs, base["visual_tokens"]["mean"] + 1)
    grid = [1 + i * (top - 1) / 400 for i in range(401)]

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    ax = axes[0]
    for phase, colour, label in (("engine", "C0", "engine"), ("end_to_end", "C1", "end to end")):
        rate = base[phase]["requests_per_s"]
        ideal = [rate * base["prompt_tokens"]["mean"] / (text_tokens + v) for v in grid]
        ax.plot(
            grid,
            ideal,
            "--",
            color=colour,
            alpha=0.6,
            label=f"prompt-ratio ideal, {label} (cost proportional to prompt tokens)",
        )
        ax.scatter(
            xs,
            [r[phase]["requests_per_s"] for r in results],
            color=colour,
            zorder=3,
            label=f"measured {label}",
        )
    label_points(ax, results, xs, [r["engine"]["requests_per_s"] for r in results], 8)
    ax.set_ylabel("requests / s")
    ax.set_title("Throughput vs visual tokens")
    ax.legend(fontsize=7)

    ax = axes[1]
    generating = [r["engine"]["max_generating_requests"] for r in results]
    ax.scatter(xs, generating, color="C2", label="most requests generating at once")
    ax.scatter(
        xs,
        [100 * r["engine"]["peak_kv_cache_usage"] for r in results],
        color="C3",
        marker="x",
        label="peak KV-cache usage (%)",
    )
    label_points(ax, results, xs, generating, 8)
    kv = data["settings"]["kv_cache_tokens"]
    ax.set_title(f"Concurrency in a {kv}-token KV cache" if kv else "Concurrency")
    ax.legend(fontsize=7)
    for ax in axes:
        token_axis(ax, top, media_labels(data["settings"])[1])
    title = (
        f"{data['model']}\n{data['settings']['num_prompts']} requests, "
        f"{data['settings']['output_len']} output tokens; "
        f"{data['environment'].get('gpu') or data['environment']['cpu']}"
    )
    save_figure(fig, out, "throughput_vs_tokens.png", title)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    shown = [r for r in results if r["name"] in ("prumerge", "prumerge+")] or results
    counts = [c for r in shown for c in r["visual_tokens_per_request"]]
    width = max(1, (max(counts) + 10) // 60)
    bins = list(range(0, max(counts) + 2 * width, width))
    for i, r in enumerate(shown):
        ax.hist(
            r["visual_tokens_per_request"],
            bins=bins,
            alpha=0.6,
            color=f"C{i}",
            label=f"{r['name']} (mean {r['visual_tokens']['mean']:.1f}, "
            f"p50 {r['visual_tokens']['p50']:.0f}, max {r['visual_tokens']['max']:.0f})",
        )
    long = media_labels(data["settings"])[1]
    ax.set_xlabel(f"visual tokens per {long} (kept + 1 extra token per image, crop or frame)")
    ax.set_ylabel(f"{long}s")
    ax.set_title(f"Adaptive token counts per {long}")
    ax.legend(fontsize=8)
    save_figure(fig, out, "visual_tokens_hist.png")
    return ["throughput_vs_tokens.png", plot_scaling(data, out), "visual_tokens_hist.png"]


# --------------------------------------------------------------------------------------------


METHOD = (
    "One vLLM engine (identical settings) serves every plugin configuration through "
    "per-request mm_processor_kwargs; prefix caching and the multimodal processor cache are "
    "off, so every request pays for its image and its whole prompt; output length is fixed "
    "(ignore_eos, greedy). Prompts: the checkpoint's own chat template applied to one user "
    "message (the image, then the question), as token ids, the prompt vllm serve builds for "
    "that message. Before the first measurement every configuration runs once on other "
    "images (tower load, code paths), and each measurement is preceded by --warmup requests "
    "of that configuration on other images. Each repeat of a configuration runs the same "
    "requests twice: end to end (pre-process and submit one by one while the engine runs, "
    "as LLM.generate) and engine only (pre-process all, then release all at once). Figures are "
    "medians over repeats (configuration order rotated per repeat). Visual tokens per image "
    "are counted in RequestOutput.prompt_token_ids (the image placeholder id); peak KV-cache "
    "usage, most running requests and preemptions come from the scheduler's per-step stats "
    "(a vLLM stat logger). Text-equivalents (text@CONFIG) run right after their "
    "configuration in every repeat, on the same engine: the image requests' prompt token ids "
    "with every image placeholder replaced by one ordinary text token."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.output_len < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--num-prompts, --output-len and --repeats must be >= 1, --warmup >= 0")
    if args.frames < 0:
        raise SystemExit("--frames must be >= 0 (0: images)")
    args.configs = args.configs or default_configs(args.frames)
    names = [c.strip().lower() for c in args.configs.split(",") if c.strip()]
    plugin_names = [n for n in names if n != STOCK]
    configs = parse_configs(",".join(plugin_names)) if plugin_names else []
    if STOCK in names:
        configs.append(BenchConfig(STOCK, "off"))
    gpu = use_cpu_if_no_gpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment({"device": "cuda" if gpu else "cpu"})
    print(env["cpu_line"], flush=True)

    wall_start = time.perf_counter()
    model, spec = (
        (args.model, None)
        if args.model
        else synthetic_checkpoint(args.synthetic, args.family, args.tower)
    )
    image_token = placeholder_token_id(model, args.frames)
    size = tuple(args.image_size)
    chat = chat_prompt(model, args.frames)
    args.chat_content_format = chat.content_format  # "string": the template drops video parts
    items = build_workload(
        args.num_prompts, args.seed, args.images, size=size, prompt=chat, frames=args.frames,
        video_kind=args.video_kind,
    )  # fmt: skip
    warm_per_round = max(args.warmup, 1)
    warm = build_workload(
        warm_per_round * len(configs) * (args.repeats + 1),
        args.seed,
        args.images,
        start=args.num_prompts,
        size=size,
        prompt=chat,
        frames=args.frames,
        video_kind=args.video_kind,
    )
    warm_iter = iter(warm)
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    tracker = StepTracker()
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    groups = [
        (False, [c for c in configs if c.name != STOCK]),
        (True, [c for c in configs if c.name == STOCK]),
    ]
    settings_used: dict[str, Any] = {}
    startup: dict[str, float] = {}
    resolved_dtype: dict[str, str] = {}
    silent = progress(0, "", disable=True)
    filler = None
    if args.text:
        from transformers import AutoTokenizer

        filler = filler_token_id(AutoTokenizer.from_pretrained(model))
    phases = 4 if args.text else 2

    with progress(
        phases * len(configs) * args.repeats * args.num_prompts,
        "throughput",
        disable=args.no_progress,
    ) as bar:
        for stock, group in groups:
            if not group:
                continue
            key = "stock" if stock else "plugin"
            settings_used[key] = run_settings(args, model, stock=stock)
            bar.set_description(f"starting {key} engine")
            t0 = time.perf_counter()
            engine = start_engine(settings_used[key], tracker)
            startup[key] = time.perf_counter() - t0
            resolved_dtype[key] = str(engine.model_config.dtype).removeprefix("torch.")
            try:
                bar.set_description("warm-up")
                for config in group:  # load the tower, touch every configuration's code path
                    chosen = [make_prompt(next(warm_iter), config) for _ in range(warm_per_round)]
                    run_end_to_end(engine, chosen, sampling, f"warm-{config.name}", silent)
                for repeat in range(args.repeats):
                    shift = repeat % len(group)
                    for config in group[shift:] + group[:shift]:
                        if args.warmup:
                            bar.set_description(f"{config.name} (warm-up)")
                            chosen = [
                                make_prompt(next(warm_iter), config) for _ in range(args.warmup)
                            ]
                            run_end_to_end(
                                engine,
                                chosen,
                                sampling,
                                f"warm-{config.name}-{repeat}",
                                silent,
                            )
                        bar.set_description(config.name)
                        result = measure(
                            engine,
                            tracker,
                            items,
                            config,
                            sampling,
                            image_token,
                            filler,
                            f"{config.name}-{repeat}",
                            bar,
                        )
                        runs[config.name].append(result)
                        bar.set_postfix_str(
                            f"{config.name}: {result['engine']['requests_per_s']:.2f} req/s, "
                            f"{sum(result['visual_tokens']) / len(items):.1f} visual tok/"
                            + media_labels(vars(args))[0]
                        )
            finally:
                stop_engine(engine)

    results = [aggregate(c, runs[c.name]) for c in configs]
    data: dict[str, Any] = {
        "benchmark": "throughput (vLLM offline)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model_label(args),
        "model_path": model,
        "synthetic_spec": spec,
        "image_token_id": image_token,  # the placeholder counted (video_token_index: videos)
        "media": {
            "modality": modality(args.frames),
            "frames": args.frames,
            "video_kind": args.video_kind if args.frames else None,
            "chat_content_format": chat.content_format,
        },
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
    return finish(out, "throughput", data, wall_start, markdown_report, plots)


if __name__ == "__main__":
    main()
