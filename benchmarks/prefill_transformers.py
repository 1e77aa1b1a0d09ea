"""Prefill latency and memory of a LLaVA-1.5-7B-shaped model at 576 vs reduced visual tokens.

For GPU machines without vLLM (torch + transformers only; never imports vLLM), random weights of
the real shapes: the LLM prefill of V visual + T text tokens, and the front end per image (the
CLIP-L/14-336 tower to LLaVA's feature layer plus the reduction: `bench_reduction.frontend`).
Method, the paper's figure and recorded figures: docs/benchmarks.md, benchmarks/RESULTS.md.

    python benchmarks/prefill_transformers.py --out out/prefill                 # GPU, 7B shape
    python benchmarks/prefill_transformers.py --shape tiny --device cpu --out out/prefill-cpu

Writes OUT/prefill.json, OUT/prefill.md and OUT/prefill.png.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import _report
from _cli import add_output_arguments, ints, names, new_parser
from bench_reduction import environment, frontend, measure

from vllm_prumerge.testing.engine_args import add_number_options

# The shape flags: (flag, transformers config field, 7b, tiny, help). 7b: LLaVA-1.5-7B = Vicuna-7B
# + CLIP-L/14-336 (None: the tower's own shape, vllm_prumerge.testing.towers); tiny: for a CPU.
SHAPE_FLAGS = (
    ("layers", "num_hidden_layers", 32, 2, "Llama decoder layers."),
    ("hidden_size", "hidden_size", 4096, 256, "Llama width."),
    ("intermediate_size", "intermediate_size", 11008, 688, "Llama MLP width."),
    ("heads", "num_attention_heads", 32, 8, "Llama attention heads (= KV heads)."),
    ("vocab_size", "vocab_size", 32064, 32064, "Llama vocabulary."),
    ("vision_layers", "num_hidden_layers", None, 2, "CLIP layers (LLaVA reads the 2nd to last)."),
    ("vision_hidden_size", "hidden_size", None, 64, "CLIP width."),
    ("vision_intermediate_size", "intermediate_size", None, 128, "CLIP MLP width."),
    ("vision_heads", "num_attention_heads", None, 4, "CLIP attention heads."),
)
DTYPES = ("auto", "float16", "bfloat16", "float32")
MODES = ("off", "prumerge", "prumerge+")
PAPER = {"device": "V100 (roofline estimate)", "prefill_ms": {"576": 88.6, "prumerge": 15.3}}
PAPER_NOTE = "Paper (LLaVA-1.5-7B, V100, roofline estimate, not measured here): prefill 88.6 ms "
PAPER_NOTE += "(576 tokens) -> 15.3 ms (PruMerge)."
# Per-image statistics of the front end's timings (`measure_frontend`).
PER_IMAGE = {"tower_plus_reduction": "per_image_ms", "reduction": "reduction_per_image_ms"}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__, "Random weights, no vLLM; JSON, Markdown and PNG output.")
    shape = parser.add_argument_group("model shape (--shape presets all; flags given override)")
    shape_help = "7b: LLaVA-1.5-7B (Vicuna-7B + CLIP-L/14-336); tiny: a few MB, for a CPU."
    add_number_options(
        shape,
        ("--shape", str, "7b", shape_help, ("7b", "tiny")),
        *((f"--{key.replace('_', '-')}", int, None, text) for key, *_, text in SHAPE_FLAGS),
    )
    v_help = "Visual token counts V of the prefill: 576 = stock LLaVA-1.5; N + 1 = N kept + "
    v_help += "PruMerge's extra token (145 ~ PruMerge+, 33 ~ PruMerge per the paper)."
    run = parser.add_argument_group("measurement")
    add_number_options(
        run,
        ("--device", str, None, "cuda, cuda:1, cpu, ... (default: cuda when available)."),
        ("--dtype", str, "auto", "auto: float16 on CUDA (the paper's), else float32.", DTYPES),
        ("--attn-implementation", str, "sdpa", "transformers attention (sdpa, eager, ...)."),
        ("--visual-tokens", ints, "576,577,289,145,65,33", v_help),
        ("--text-tokens", int, 64, "Text tokens T added to every prompt (system, user, question)."),
        ("--prefill-batch-sizes", ints, "1", "Batch sizes of the prefill (the paper's: 1)."),
        ("--frontend-batch-sizes", ints, "1,8", "Image batch sizes of tower + reduction."),
        ("--modes", names(*MODES), "off,prumerge,prumerge+", "Front-end modes (off: stock)."),
        ("--warmup", int, 3, "Untimed runs before each measurement."),
        ("--iters", int, 10, "Timed runs per measurement."),
        ("--seed", int, 0, "Seed of weights, inputs and scenes."),
        ("--threads", int, 0, "torch CPU threads (0: torch's; on a shared CPU 1 is steadier)."),
    )
    run.add_argument("--skip-prefill", action="store_true", help="Only the front end.")
    run.add_argument("--skip-frontend", action="store_true", help="Only the LLM prefill.")
    folder_help = "Folder for prefill.json, prefill.md and prefill.png (created)."
    add_output_arguments(parser, "out/prefill", folder_help, plots="PNG plot")
    return parser


def resolve_shape(args: argparse.Namespace) -> dict[str, int]:
    """The shape flags given explicitly, else the --shape preset's values."""
    from vllm_prumerge.testing.towers import TOWER_SHAPES

    shape = {}
    for key, field, big, tiny, _ in SHAPE_FLAGS:
        preset = (big if args.shape == "7b" else tiny) or TOWER_SHAPES["clip-l-336"][field]
        shape[key] = preset if getattr(args, key) is None else getattr(args, key)
    return shape


def config_fields(shape: dict[str, int], vision: bool) -> dict[str, int]:
    """transformers' config fields of `shape`'s Llama, or (`vision`) of its CLIP tower."""
    return {f: shape[key] for key, f, *_ in SHAPE_FLAGS if key.startswith("vision_") == vision}


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """median, mean, min and p90 (nearest rank) of `seconds`, in milliseconds."""
    ordered = sorted(1e3 * s for s in seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    median, mean = statistics.median(ordered), statistics.fmean(ordered)
    return {"median": median, "mean": mean, "min": ordered[0], "p90": p90}


def mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def build_llm(shape: dict[str, int], dtype: Any, device: Any, attn: str) -> Any:
    """The Llama of `shape` (as Vicuna-7B: KV heads = heads, untied head), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {**config_fields(shape, vision=False), "num_key_value_heads": shape["heads"]}
    config = LlamaConfig(**fields, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def measure_prefill(model: Any, args: argparse.Namespace, device: Any, bar: Any) -> list[dict]:
    """Latency, peak memory above the weights (CUDA) and KV-cache bytes of one prefill of
    V + T random input embeddings, per batch size and V."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    rows = []
    for batch, visual in itertools.product(args.prefill_batch_sizes, args.visual_tokens):
        length = visual + args.text_tokens
        embeds = 0.02 * torch.randn(batch, length, model.config.hidden_size, generator=generator)
        embeds = embeds.to(device=device, dtype=model.dtype)

        def forward(embeds: Any = embeds) -> Any:
            with torch.inference_mode():
                return model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

        timing = measure(forward, device, args.iters, args.warmup)
        layers = getattr(forward().past_key_values, "layers", [])
        tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
        kv_bytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        row = {"batch_size": batch, "visual_tokens": visual, "text_tokens": args.text_tokens}
        row.update(prompt_tokens=length, latency_ms=stats_ms(timing["samples_s"]))
        row.update(peak_memory_bytes=timing["peak_bytes"], kv_cache_bytes=kv_bytes or None)
        rows.append(row)
        bar.update(1)
    return rows


def measure_frontend(tower: Any, args: argparse.Namespace, device: Any, bar: Any) -> list[dict]:
    """`frontend` per batch size and mode, its timings as `stats_ms` of the batch (`*_ms`) and
    per image (`per_image_ms`, `reduction_per_image_ms`)."""
    rows = []
    for batch, mode in itertools.product(args.frontend_batch_sizes, args.modes):
        row = frontend(tower, batch, mode, device, args.iters, args.warmup, args.seed)
        for key, per_image in PER_IMAGE.items():
            seconds = row.pop(key)["samples_s"]
            row[f"{key}_ms"] = stats_ms(seconds)
            row[per_image] = stats_ms([t / batch for t in seconds])
        rows.append(row)
        bar.update(1)
    return rows


FRONTEND_COLUMNS = [
    ("batch", "batch_size"),
    ("mode", "mode"),
    ("tower+reduction ms/img", "per_image_ms.median"),
    ("reduction ms/img", "reduction_per_image_ms.median"),
    ("batch ms", "tower_plus_reduction_ms.median"),
    ("peak MiB", lambda r: mib(r["peak_memory_bytes"])),
    ("visual tokens/img (random tower)", lambda r: str(r["visual_tokens_per_image"][:8])[1:-1]),
]


def markdown_report(data: dict[str, Any]) -> str:
    env, shape, settings = data["environment"], data["shape"], data["settings"]
    versions = env["versions"]
    lines = [
        "# Prefill and front-end cost without vLLM (transformers, random weights)",
        "",
        f"Shape `{settings['shape']}` (Llama {shape['hidden_size']}x{shape['layers']}, "
        f"CLIP {shape['vision_hidden_size']}x{shape['vision_layers']}), dtype {data['dtype']}, "
        f"attention {settings['attn_implementation']}, device {data['device']} "
        f"({_report.device_name(env)}, {env['torch_threads']} torch threads); torch "
        f"{versions.get('torch')}, transformers {versions.get('transformers')}; {env['date']}. "
        f"Median of {settings['iters']} runs after {settings['warmup']} warm-up runs.",
        "",
    ]
    if data["prefill"]:
        base = {r["batch_size"]: r for r in data["prefill"] if r["visual_tokens"] == 576}

        def vs_576(key: str) -> Any:  # the batch's 576 row over this row
            cell = _report.cell
            return lambda r: _report.ratio(cell(base.get(r["batch_size"], {}), key), cell(r, key))

        columns = [
            ("batch", "batch_size"),
            ("V", "visual_tokens"),
            ("V+T", "prompt_tokens"),
            ("latency ms (median)", "latency_ms.median"),
            ("p90", "latency_ms.p90"),
            ("speed-up vs 576", vs_576("latency_ms.median")),
            ("ideal (token ratio)", vs_576("prompt_tokens")),
            ("peak MiB above weights", lambda r: mib(r["peak_memory_bytes"])),
            ("KV cache MiB", lambda r: mib(r["kv_cache_bytes"])),
        ]
        lines += ["## LLM prefill (V visual + T text tokens)", ""]
        lines += [_report.table(data["prefill"], columns), PAPER_NOTE, ""]
    if data["frontend"]:
        lines += [
            "## Front end per image (CLIP tower to the feature layer + reduction)",
            "",
            _report.table(data["frontend"], FRONTEND_COLUMNS),
            "Token counts of a random-weight tower are not those of the trained CLIP (its class "
            "attention is not peaked the same way); the LLM prefill above uses the paper's counts.",
            "",
        ]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """prefill.png: latency (measured, and proportional to the prompt) and memory against V."""
    fig, (left, right) = _report.pyplot().subplots(1, 2, figsize=(11, 4.3))
    for i, batch in enumerate(sorted({r["batch_size"] for r in data["prefill"]})):
        rows = [r for r in data["prefill"] if r["batch_size"] == batch]
        rows.sort(key=lambda r: r["visual_tokens"])
        xs, style = [r["visual_tokens"] for r in rows], {"color": f"C{i}"}
        top = next((r for r in rows if r["visual_tokens"] == 576), rows[-1])
        scale = top["latency_ms"]["median"] / top["prompt_tokens"]
        lines = [  # (axes, y values, format, alpha, label) of this batch
            (left, [r["latency_ms"]["median"] for r in rows], "o-", 1, "measured"),
            (left, [scale * r["prompt_tokens"] for r in rows], "--", 0.5, "proportional to tokens"),
            (right, [mib(r["peak_memory_bytes"]) for r in rows], "o-", 1, "peak above weights"),
            (right, [mib(r["kv_cache_bytes"]) for r in rows], "s--", 0.6, "KV cache"),
        ]
        for ax, ys, fmt, alpha, label in lines:
            if all(y is not None for y in ys) and (label != "KV cache" or all(ys)):
                ax.plot(xs, ys, fmt, **style, alpha=alpha, label=f"{label}, batch {batch}")
    left.set_ylabel("prefill latency (ms, median)")
    right.set_ylabel("MiB")
    if not any(r["peak_memory_bytes"] is not None for r in data["prefill"]):
        right.set_title("KV cache (peak memory is measured on CUDA only)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("visual tokens")
        ax.legend(fontsize=7)
    device = _report.device_name(data["environment"])
    title = f"LLM prefill, shape {data['settings']['shape']}, {data['dtype']}, {device}"
    return [_report.save_figure(fig, out, "prefill.png", title)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import torch

    from vllm_prumerge.testing.towers import build_tower

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda, dtype_name = device.type == "cuda", args.dtype
    if dtype_name == "auto":
        dtype_name = "float16" if cuda else "float32"
    dtype, shape = getattr(torch, dtype_name), resolve_shape(args)
    torch.manual_seed(args.seed)
    data: dict[str, Any] = {
        "benchmark": "prefill + front end (transformers, random weights, no vLLM)",
        **{"settings": dict(vars(args)), "shape": shape, "dtype": dtype_name},
        **{"device": str(device), "environment": environment(device=str(device))},
        **{"paper": PAPER, "prefill": [], "frontend": []},
    }
    prefill = 0 if args.skip_prefill else len(args.prefill_batch_sizes) * len(args.visual_tokens)
    front = 0 if args.skip_frontend else len(args.frontend_batch_sizes) * len(args.modes)
    wall, attn = time.perf_counter(), args.attn_implementation
    with _report.progress(prefill + front, "prefill", disable=args.no_progress) as bar:
        if prefill:
            bar.set_description("building LLM")
            model = build_llm(shape, dtype, device, attn)
            data["llm_parameters"] = sum(p.numel() for p in model.parameters())
            if cuda:
                data["llm_weights_bytes"] = torch.cuda.memory_allocated(device)
            bar.set_description("LLM prefill")
            data["prefill"] = measure_prefill(model, args, device, bar)
            del model
            if cuda:
                torch.cuda.empty_cache()
        if front:
            bar.set_description("building CLIP tower")
            clip = config_fields(shape, vision=True)
            clip["projection_dim"] = clip["hidden_size"]
            tower = build_tower("clip-l-336", dtype, device, attn, **clip)
            data["tower_parameters"] = sum(p.numel() for p in tower.parameters())
            bar.set_description("front end")
            data["frontend"] = measure_frontend(tower, args, device, bar)
    plots = None if args.no_plots or not data["prefill"] else plot
    return _report.finish(Path(args.out), "prefill", data, wall, markdown_report, plots)


if __name__ == "__main__":
    main()
