"""Benchmark the PruMerge / PruMerge+ reduction core (project issue 3).

Measures, on one device:
1. the batched reduction (``vllm_prumerge.reduction.reduce_tokens``) against the deliberately
   naive per-token transcription of the reference (``vllm_prumerge.testing.naive_reference``:
   one image at a time, a Python loop per kept token, NumPy quartiles), for several batch sizes
   B and patch counts N, at width C;
2. a CLIP ViT-L/14-336-shaped tower forward (random weights: 24 layers, width 1024, 16 heads,
   MLP 4096, 336 px / patch 14 = 576 patches) at the same batch sizes, so the reduction's cost
   can be stated as a percentage of the tower's forward (N = 576 only).

Inputs are synthetic (``synthetic_inputs(kind="clip")``: about 5% attention outliers, like
CLIP-L/14-336 on natural images); nothing is downloaded. Every timing is wall clock,
device-synchronised, after warm-up calls, and also as this process's CPU time (with
``--threads 1``, unaffected by other tenants of a shared machine). Medians and minima are
recorded; the table shows minima (the least disturbed by other load) and speed-ups compare
them; "reduction / tower" divides the reduction's time by the tower forward's at the same B.
Progress goes to stderr, a Markdown table to stdout, everything as JSON to ``--out``.

Example (the run recorded in benchmarks/RESULTS.md):
    python benchmarks/bench_reduction.py --device cpu --threads 1 --out bench_reduction_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import cpu_model

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import reduce_tokens
from vllm_prumerge.testing.engine_args import add_number_options
from vllm_prumerge.testing.naive_reference import naive_prumerge, synthetic_inputs
from vllm_prumerge.testing.towers import build_tower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _modes(text: str) -> list[str]:
    modes = [PruMergeConfig(mode=part.strip()).mode for part in text.split(",") if part.strip()]
    if any(mode not in ("prumerge", "prumerge+") for mode in modes):
        raise argparse.ArgumentTypeError("--modes takes prumerge and/or prumerge+")
    return modes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where everything runs"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the features/q/k and of the tower (reduction statistics are float32)",
    )
    parser.add_argument(
        "--batch-sizes", type=_ints, default="1,8,32", help="comma-separated batch sizes B"
    )
    parser.add_argument(
        "--patches", type=_ints, default="576,2304", help="comma-separated patch counts N"
    )
    parser.add_argument("--width", type=int, default=1024, help="feature / key width C")
    parser.add_argument(
        "--modes", type=_modes, default="prumerge,prumerge+", help="reduction modes timed"
    )
    add_number_options(
        parser,
        ("--repeats", int, 9, "timed repeats of the batched reduction"),
        ("--naive-repeats", int, 3, "timed repeats of the naive transcription"),
        (
            "--naive-max-patches",
            int,
            32 * 576,
            "skip the naive path (reported as not measured) when B * N exceeds this; the "
            "default times it everywhere at N = 576 and up to B = 8 at N = 2304",
        ),
    )
    parser.add_argument(
        "--tower-batch-sizes",
        type=_ints,
        default=None,
        help="batch sizes of the tower forward (N = 576); unset: --batch-sizes; '' skips it",
    )
    add_number_options(
        parser,
        ("--tower-repeats", int, 1, "timed repeats of each tower forward"),
        (
            "--tower-warmup",
            int,
            1,
            "untimed tower forwards at B = 1 before timing (larger B are not warmed up again)",
        ),
        ("--warmup", int, 1, "untimed calls before each timed measurement"),
        ("--threads", int, None, "torch.set_num_threads; unset: torch's default"),
        ("--seed", int, 0, "seed of the synthetic inputs"),
    )
    parser.add_argument(
        "--no-malloc-tuning",
        dest="malloc_tuning",
        action="store_false",
        help="keep glibc's default malloc thresholds; by default freed memory stays in the heap "
        "(mallopt M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 256 MiB), so the naive loop's "
        "megabyte-sized temporaries are not page-faulted afresh on every kept token",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.tower_batch_sizes is None:
        args.tower_batch_sizes = list(args.batch_sizes)
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Seconds of ``fn``: wall clock (device-synchronised) and this process's CPU time.

    CPU time (all threads of the process) is what the call cost the host; with one thread it is
    unaffected by other tenants of a shared machine, unlike wall time.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(max(repeats, 1)):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "samples_s": wall,
        "cpu_median_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
        "cpu_samples_s": cpu,
    }


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def bench_reduction(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    dtype = DTYPES[args.dtype]
    for n_patches in args.patches:
        for batch in args.batch_sizes:
            features, q_cls, keys = (
                t.to(device)
                for t in synthetic_inputs(
                    batch, n_patches, args.width, "clip", seed=args.seed, dtype=dtype
                )
            )
            for mode in args.modes:
                config = PruMergeConfig(mode=mode)
                out = reduce_tokens(features, q_cls, keys, config)
                kept = out.num_kept.float()
                fast = measure(
                    lambda c=config, f=features, q=q_cls, k=keys: reduce_tokens(f, q, k, c),
                    device,
                    args.repeats,
                    args.warmup,
                )
                row = {
                    "mode": mode,
                    "batch": batch,
                    "patches": n_patches,
                    "width": args.width,
                    "mean_kept": float(kept.mean()),
                    "min_kept": int(kept.min()),
                    "max_kept": int(kept.max()),
                    "fast": fast,
                    "naive": None,
                    "speedup": None,
                    "speedup_cpu": None,
                }
                if batch * n_patches <= args.naive_max_patches:
                    plus = mode == "prumerge+"

                    def naive(f=features, q=q_cls, k=keys, plus=plus, b=batch):
                        for i in range(b):
                            naive_prumerge(f[i], q[i], k[i], plus=plus)

                    row["naive"] = measure(naive, device, args.naive_repeats, args.warmup)
                    # Minimum times: the least disturbed by other load on a shared machine.
                    row["speedup"] = row["naive"]["min_s"] / fast["min_s"]
                    row["speedup_cpu"] = row["naive"]["cpu_min_s"] / fast["cpu_min_s"]
                naive_text = (
                    f"naive {row['naive']['min_s'] * 1e3:9.1f} ms  x{row['speedup']:.1f}"
                    if row["naive"]
                    else "naive not measured"
                )
                log(
                    f"reduction {mode:9s} B={batch:<3d} N={n_patches:<5d} "
                    f"kept~{row['mean_kept']:.0f}  fast {fast['min_s'] * 1e3:8.2f} ms  "
                    f"{naive_text}"
                )
                rows.append(row)
    return rows


def bench_tower(args: argparse.Namespace, device: torch.device) -> list[dict]:
    if not args.tower_batch_sizes:
        return []
    dtype = DTYPES[args.dtype]
    log("building a random-weight CLIP ViT-L/14-336 tower")
    tower = build_tower("clip-l-336", dtype, device)
    warm = torch.randn(1, 3, 336, 336).to(device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(args.tower_warmup):
            tower(warm)
    rows = []
    for batch in args.tower_batch_sizes:
        gen = torch.Generator().manual_seed(args.seed)
        pixels = torch.randn(batch, 3, 336, 336, generator=gen).to(device=device, dtype=dtype)

        def forward(p=pixels):
            with torch.inference_mode():
                tower(p)

        log(f"tower forward B={batch} ({args.tower_repeats} timed)")
        timing = measure(forward, device, args.tower_repeats, warmup=0)
        log(f"tower forward B={batch:<3d} {timing['median_s'] * 1e3:10.1f} ms")
        rows.append(
            {
                "batch": batch,
                "attn_implementation": tower.config._attn_implementation,
                "forward": timing,
            }
        )
    return rows


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    import numpy
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "device": str(device),
        "dtype": args.dtype,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(results: dict) -> str:
    """The measured table (milliseconds, minima); cells that were not measured say so."""
    towers = {row["batch"]: row["forward"] for row in results["tower"]}
    lines = [
        "| mode | B | N | kept (mean) | reduction wall / CPU | naive wall / CPU "
        "| speed-up wall / CPU | tower fwd wall / CPU | reduction / tower wall / CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["reduction"]:
        fast = row["fast"]
        naive, speedup, tower_text, share = "not measured", "-", "-", "-"
        if row["naive"]:
            naive = f"{row['naive']['min_s'] * 1e3:.1f} / {row['naive']['cpu_min_s'] * 1e3:.1f}"
            speedup = f"{row['speedup']:.1f}x / {row['speedup_cpu']:.1f}x"
        tower = towers.get(row["batch"]) if row["patches"] == 576 else None
        if tower:
            tower_text = f"{tower['min_s'] * 1e3:.0f} / {tower['cpu_min_s'] * 1e3:.0f}"
            share = (
                f"{100 * fast['min_s'] / tower['min_s']:.3f}% / "
                f"{100 * fast['cpu_min_s'] / tower['cpu_min_s']:.3f}%"
            )
        lines.append(
            f"| {row['mode']} | {row['batch']} | {row['patches']} | {row['mean_kept']:.1f} "
            f"| {fast['min_s'] * 1e3:.2f} / {fast['cpu_min_s'] * 1e3:.2f} | {naive} | {speedup} "
            f"| {tower_text} | {share} |"
        )
    return "\n".join(lines)


def tune_malloc() -> bool:
    """Stop glibc returning freed megabyte blocks to the OS (see ``--no-malloc-tuning``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    malloc_tuned = tune_malloc() if args.malloc_tuning else False
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    results = {"environment": {**environment(args, device), "malloc_tuned": malloc_tuned}}
    log(f"environment: {json.dumps(results['environment'])}")
    with torch.inference_mode():
        results["reduction"] = bench_reduction(args, device)
    results["tower"] = bench_tower(args, device)
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    table = markdown(results)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({**results, "markdown": table}, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
