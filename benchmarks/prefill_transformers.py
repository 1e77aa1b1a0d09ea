"""Prefill latency and memory of a LLaVA-1.5-7B-shaped model at 576 vs reduced visual tokens.

For machines with a GPU but without vLLM (torch + transformers only; this script never imports
vLLM). Two measurements, on random weights of the real shapes (no download):

1. LLM prefill: a Vicuna-7B-shaped Llama (4096 wide, 32 layers, 32 heads, MLP 11008, vocab
   32064) run once over `V + T` prompt tokens (`V` visual tokens, `T` text tokens; input
   embeddings, KV cache on, logits of the last position only, as a server's prefill), for
   V = 576 (stock LLaVA-1.5) and the reduced counts (PruMerge keeps ~32 + 1, PruMerge+ ~144 + 1
   on LLaVA-1.5 per the paper). Latency (median of --iters) and peak memory above the weights.
2. Front end per image: the CLIP-L/14-336 tower up to LLaVA's feature layer plus the reduction
   (`vllm_prumerge.vision.clip_prumerge_inputs` + `vllm_prumerge.reduction.reduce_tokens`),
   at batch 1 and 8, for off / prumerge / prumerge+, and the reduction alone.

The paper's efficiency table (V100, a roofline estimate, not a measurement) gives prefill
88.6 -> 15.3 ms for LLaVA-1.5-7B with PruMerge; this script measures the same quantity.

    python benchmarks/prefill_transformers.py --out out/prefill                 # GPU, 7B shape
    python benchmarks/prefill_transformers.py --shape tiny --device cpu --out out/prefill-cpu

Writes OUT/prefill.json, OUT/prefill.md and OUT/prefill.png.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _report
from _cli import add_output_arguments, new_parser

from vllm_prumerge.testing.towers import spec_fields

# Model shapes: LLaVA-1.5-7B (Vicuna-7B + CLIP-L/14-336) and a tiny one for CPU validation.
_LLAMA = ("layers", "hidden_size", "intermediate_size", "heads", "vocab_size")
_CLIP = ("vision_layers", "vision_hidden_size", "vision_intermediate_size", "vision_heads")
SHAPES: dict[str, dict[str, int]] = {
    "7b": {
        **dict(zip(_LLAMA, (32, 4096, 11008, 32, 32064), strict=True)),
        **spec_fields("clip-l-336"),
    },
    "tiny": {
        **dict(zip(_LLAMA, (2, 256, 688, 8, 32064), strict=True)),
        **dict(zip(_CLIP, (2, 64, 128, 4), strict=True)),
    },
}
PAPER = {"device": "V100 (roofline estimate)", "prefill_ms": {"576": 88.6, "prumerge": 15.3}}


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        __doc__,
        "Random weights, torch + transformers only (no vLLM); JSON, Markdown and PNG output.",
    )
    shape = parser.add_argument_group(
        "model shape (--shape sets all; a flag given explicitly overrides it)"
    )
    shape.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="7b",
        help="7b: LLaVA-1.5-7B (Vicuna-7B + CLIP-L/14-336); tiny: a few MB, for validating the "
        "script on a CPU.",
    )
    for name, help_text in (
        ("layers", "Llama decoder layers."),
        ("hidden-size", "Llama width."),
        ("intermediate-size", "Llama MLP width."),
        ("heads", "Llama attention heads (= KV heads)."),
        ("vocab-size", "Llama vocabulary."),
        ("vision-layers", "CLIP layers (LLaVA's feature layer is the second to last)."),
        ("vision-hidden-size", "CLIP width."),
        ("vision-intermediate-size", "CLIP MLP width."),
        ("vision-heads", "CLIP attention heads."),
    ):
        shape.add_argument(f"--{name}", type=int, default=None, help=help_text)
    run = parser.add_argument_group("measurement")
    run.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)."
    )
    run.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="Compute dtype (auto: float16 on CUDA, as the paper's FP16 figures; float32 on CPU).",
    )
    run.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="transformers attention implementation for both models (sdpa, eager, "
        "flash_attention_2 if installed).",
    )
    run.add_argument(
        "--visual-tokens",
        default="576,577,289,145,65,33",
        help="Visual token counts V for the LLM prefill: 576 = stock LLaVA-1.5; N + 1 = N kept "
        "tokens plus PruMerge's extra token (145 ~ PruMerge+, 33 ~ PruMerge on LLaVA-1.5-7B per "
        "the paper; 577 = fixed budget 576).",
    )
    run.add_argument(
        "--text-tokens",
        type=int,
        default=64,
        help="Text tokens T added to every prompt (system/user text + question).",
    )
    run.add_argument(
        "--prefill-batch-sizes",
        default="1",
        help="Comma-separated batch sizes of the LLM prefill (the paper's figure is batch 1).",
    )
    run.add_argument(
        "--frontend-batch-sizes",
        default="1,8",
        help="Comma-separated image batch sizes of the CLIP tower + reduction measurement.",
    )
    run.add_argument(
        "--modes",
        default="off,prumerge,prumerge+",
        help="Reduction modes timed in the front end (off = features only, the stock cost).",
    )
    run.add_argument("--warmup", type=int, default=3, help="Untimed runs before each measurement.")
    run.add_argument("--iters", type=int, default=10, help="Timed runs per measurement.")
    run.add_argument("--seed", type=int, default=0, help="Seed of weights, inputs and scenes.")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default). On a shared CPU, 1 avoids OpenMP threads "
        "waiting on each other (measured here: 2 threads were 16x slower than 1 under load).",
    )
    run.add_argument("--skip-prefill", action="store_true", help="Only the front end.")
    run.add_argument("--skip-frontend", action="store_true", help="Only the LLM prefill.")
    add_output_arguments(
        parser,
        "out/prefill",
        "Folder for prefill.json, prefill.md and prefill.png (created).",
        plots="PNG plot",
    )
    return parser


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(SHAPES[args.shape])
    for key in shape:
        value = getattr(args, key)
        if value is not None:
            shape[key] = value
    return shape


class Timer:
    """Wall time of a callable, synchronising the device around each run."""

    def __init__(self, device: Any) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Any, warmup: int, iters: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return times


def stats_ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median": 1e3 * statistics.median(ordered),
        "mean": 1e3 * statistics.fmean(ordered),
        "min": 1e3 * ordered[0],
        "p90": 1e3 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


@contextlib.contextmanager
def peak_memory(device: Any):
    """Yields a dict filled on exit with the peak allocated bytes above the starting point
    (CUDA only; None elsewhere)."""
    import torch

    result: dict[str, int | None] = {"peak_bytes": None}
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base


# --------------------------------------------------------------------------------------------
# LLM prefill


def build_llm(shape: dict[str, int], dtype: Any, device: Any, attn: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def measure_prefill(model: Any, args: argparse.Namespace, device: Any, bar: Any) -> list[dict]:
    import torch

    timer = Timer(device)
    hidden = model.config.hidden_size
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    dtype = next(model.parameters()).dtype
    results = []
    for batch in int_list(args.prefill_batch_sizes):
        for visual in int_list(args.visual_tokens):
            length = visual + args.text_tokens
            embeds = (0.02 * torch.randn(batch, length, hidden, generator=generator)).to(
                device=device, dtype=dtype
            )

            def forward(embeds: Any = embeds) -> Any:
                with torch.inference_mode():
                    return model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

            times = timer(forward, args.warmup, args.iters)
            with peak_memory(device) as memory:
                output = forward()
            kv_bytes = 0
            cache = output.past_key_values
            for layer in getattr(cache, "layers", []):
                for name in ("keys", "values"):
                    tensor = getattr(layer, name, None)
                    if tensor is not None:
                        kv_bytes += tensor.numel() * tensor.element_size()
            del output, cache
            results.append(
                {
                    "batch_size": batch,
                    "visual_tokens": visual,
                    "text_tokens": args.text_tokens,
                    "prompt_tokens": length,
                    "latency_ms": stats_ms(times),
                    "peak_memory_bytes": memory["peak_bytes"],
                    "kv_cache_bytes": kv_bytes or None,
                }
            )
            bar.update(1)
    return results


# --------------------------------------------------------------------------------------------
# Front end


def build_tower(shape: dict[str, int], dtype: Any, device: Any, attn: str) -> Any:
    """CLIP-L/14-336 (`vllm_prumerge.testing.towers`) at the shape's width and depth."""
    from vllm_prumerge.testing.towers import build_tower as tower

    return tower(
        "clip-l-336",
        dtype,
        device,
        attn,
        hidden_size=shape["vision_hidden_size"],
        intermediate_size=shape["vision_intermediate_size"],
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=shape["vision_heads"],
        projection_dim=shape["vision_hidden_size"],
    )


def pixel_batch(count: int, seed: int) -> Any:
    """`[count, 3, 336, 336]` CLIP-normalised pixels of generated scenes (random pixels when
    PIL is missing)."""
    import torch

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    try:
        import numpy as np

        from vllm_prumerge.testing import make_scene

        images = [make_scene(seed * 100_003 + i) for i in range(count)]
        pixels = torch.stack(
            [torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0) for img in images]
        ).permute(0, 3, 1, 2)
    except ImportError:
        pixels = torch.rand(count, 3, 336, 336, generator=torch.Generator().manual_seed(seed))
    return (pixels - mean) / std


def measure_frontend(tower: Any, args: argparse.Namespace, device: Any, bar: Any) -> list[dict]:
    import torch

    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.reduction import reduce_tokens
    from vllm_prumerge.vision import clip_prumerge_inputs

    timer = Timer(device)
    dtype = next(tower.parameters()).dtype
    results = []
    for batch in int_list(args.frontend_batch_sizes):
        pixels = pixel_batch(batch, args.seed).to(device=device, dtype=dtype)
        with torch.inference_mode():
            inputs = clip_prumerge_inputs(tower, pixels, -2)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            config = PruMergeConfig(mode=mode)

            def full(config: PruMergeConfig = config, pixels: Any = pixels) -> Any:
                with torch.inference_mode():
                    return reduce_tokens(*clip_prumerge_inputs(tower, pixels, -2), config)

            def reduction_only(config: PruMergeConfig = config, inputs: Any = inputs) -> Any:
                with torch.inference_mode():
                    return reduce_tokens(*inputs, config)

            total = timer(full, args.warmup, args.iters)
            reduction = timer(reduction_only, args.warmup, args.iters)
            with peak_memory(device) as memory:
                reduced = full()
            lengths = list(reduced.host_lengths)
            results.append(
                {
                    "batch_size": batch,
                    "mode": mode,
                    "tower_plus_reduction_ms": stats_ms(total),
                    "reduction_ms": stats_ms(reduction),
                    "per_image_ms": stats_ms([t / batch for t in total]),
                    "reduction_per_image_ms": stats_ms([t / batch for t in reduction]),
                    "peak_memory_bytes": memory["peak_bytes"],
                    "visual_tokens_per_image": lengths,
                }
            )
            bar.update(1)
    return results


# --------------------------------------------------------------------------------------------
# Reports


def mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def markdown_report(data: dict[str, Any]) -> str:
    env = data["environment"]
    shape = data["shape"]
    device = _report.device_name(env)
    lines = [
        "# Prefill and front-end cost without vLLM (transformers, random weights)",
        "",
        f"Shape `{data['settings']['shape']}` (Llama {shape['hidden_size']}x{shape['layers']}, "
        f"CLIP {shape['vision_hidden_size']}x{shape['vision_layers']}), dtype {data['dtype']}, "
        f"attention {data['settings']['attn_implementation']}, device {data['device']} "
        f"({device}, {env['torch_threads']} torch threads); torch {env['versions'].get('torch')}, "
        f"transformers "
        f"{env['versions'].get('transformers')}; {env['date']}. Median of "
        f"{data['settings']['iters']} runs after {data['settings']['warmup']} warm-up runs.",
        "",
    ]
    if data["prefill"]:
        base = {r["batch_size"]: r for r in data["prefill"] if r["visual_tokens"] == 576}
        rows = []
        for r in data["prefill"]:
            b = base.get(r["batch_size"])
            rows.append(
                [
                    r["batch_size"],
                    r["visual_tokens"],
                    r["prompt_tokens"],
                    r["latency_ms"]["median"],
                    r["latency_ms"]["p90"],
                    b["latency_ms"]["median"] / r["latency_ms"]["median"] if b else None,
                    b["prompt_tokens"] / r["prompt_tokens"] if b else None,
                    mib(r["peak_memory_bytes"]),
                    mib(r["kv_cache_bytes"]),
                ]
            )
        lines += [
            "## LLM prefill (V visual + T text tokens)",
            "",
            _report.markdown_table(
                [
                    "batch",
                    "V",
                    "V+T",
                    "latency ms (median)",
                    "p90",
                    "speed-up vs 576",
                    "ideal (token ratio)",
                    "peak MiB above weights",
                    "KV cache MiB",
                ],
                rows,
            ),
            "Paper (LLaVA-1.5-7B, V100, roofline estimate, not measured here): prefill 88.6 ms "
            "(576 tokens) -> 15.3 ms (PruMerge).",
            "",
        ]
    if data["frontend"]:
        lines += [
            "## Front end per image (CLIP tower to the feature layer + reduction)",
            "",
            _report.markdown_table(
                [
                    "batch",
                    "mode",
                    "tower+reduction ms/img",
                    "reduction ms/img",
                    "batch ms",
                    "peak MiB",
                    "visual tokens/img (random tower)",
                ],
                [
                    [
                        r["batch_size"],
                        r["mode"],
                        r["per_image_ms"]["median"],
                        r["reduction_per_image_ms"]["median"],
                        r["tower_plus_reduction_ms"]["median"],
                        mib(r["peak_memory_bytes"]),
                        ", ".join(str(n) for n in r["visual_tokens_per_image"][:8]),
                    ]
                    for r in data["frontend"]
                ],
            ),
            "Token counts of a random-weight tower are not those of the trained CLIP (its class "
            "attention is not peaked the same way); the LLM prefill above uses the paper's counts.",
            "",
        ]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[str]:
    plt = _report.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, batch in enumerate(sorted({r["batch_size"] for r in data["prefill"]})):
        rows = sorted(
            (r for r in data["prefill"] if r["batch_size"] == batch),
            key=lambda r: r["visual_tokens"],
        )
        xs = [r["visual_tokens"] for r in rows]
        axes[0].plot(
            xs,
            [r["latency_ms"]["median"] for r in rows],
            "o-",
            color=f"C{i}",
            label=f"measured, batch {batch}",
        )
        top = next((r for r in rows if r["visual_tokens"] == 576), rows[-1])
        axes[0].plot(
            xs,
            [top["latency_ms"]["median"] * r["prompt_tokens"] / top["prompt_tokens"] for r in rows],
            "--",
            color=f"C{i}",
            alpha=0.5,
            label=f"proportional to tokens, batch {batch}",
        )
        if rows[0]["peak_memory_bytes"] is not None:
            axes[1].plot(
                xs,
                [mib(r["peak_memory_bytes"]) for r in rows],
                "o-",
                color=f"C{i}",
                label=f"peak above weights, batch {batch}",
            )
        if all(r["kv_cache_bytes"] for r in rows):
            axes[1].plot(
                xs,
                [mib(r["kv_cache_bytes"]) for r in rows],
                "s--",
                color=f"C{i}",
                alpha=0.6,
                label=f"KV cache, batch {batch}",
            )
    axes[0].set_xlabel("visual tokens")
    axes[0].set_ylabel("prefill latency (ms, median)")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("visual tokens")
    axes[1].set_ylabel("MiB")
    if not any(r["peak_memory_bytes"] is not None for r in data["prefill"]):
        axes[1].set_title("KV cache (peak memory is measured on CUDA only)", fontsize=9)
    axes[1].legend(fontsize=7)
    device = _report.device_name(data["environment"])
    title = f"LLM prefill, shape {data['settings']['shape']}, {data['dtype']}, {device}"
    return [_report.save_figure(fig, out, "prefill.png", title)]


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "float16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    shape = resolve_shape(args)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"device": str(device)}
    data: dict[str, Any] = {
        "benchmark": "prefill + front end (transformers, random weights, no vLLM)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": dict(vars(args)),
        "shape": shape,
        "dtype": dtype_name,
        "device": str(device),
        "environment": _report.environment(extra),
        "paper": PAPER,
        "prefill": [],
        "frontend": [],
    }
    steps = (
        0
        if args.skip_prefill
        else len(int_list(args.prefill_batch_sizes)) * len(int_list(args.visual_tokens))
    ) + (
        0
        if args.skip_frontend
        else len(int_list(args.frontend_batch_sizes))
        * len([m for m in args.modes.split(",") if m.strip()])
    )
    wall = time.perf_counter()
    with _report.progress(steps, "prefill", disable=args.no_progress) as bar:
        if not args.skip_prefill:
            bar.set_description("building LLM")
            model = build_llm(shape, dtype, device, args.attn_implementation)
            data["llm_parameters"] = sum(p.numel() for p in model.parameters())
            if device.type == "cuda":
                data["llm_weights_bytes"] = torch.cuda.memory_allocated(device)
            bar.set_description("LLM prefill")
            data["prefill"] = measure_prefill(model, args, device, bar)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.skip_frontend:
            bar.set_description("building CLIP tower")
            tower = build_tower(shape, dtype, device, args.attn_implementation)
            data["tower_parameters"] = sum(p.numel() for p in tower.parameters())
            bar.set_description("front end")
            data["frontend"] = measure_frontend(tower, args, device, bar)
    plots = None if args.no_plots or not data["prefill"] else plot
    return _report.finish(out, "prefill", data, wall, markdown_report, plots)


if __name__ == "__main__":
    main()
