"""The reduction core and the vision tower on one device, with torch and transformers only.

Measurements (method and recorded figures: docs/benchmarks.md, benchmarks/RESULTS.md):
  (default)   the batched reduction against the naive per-token transcription of the reference
              at batch sizes B and patch counts N, and the CLIP ViT-L/14-336 tower to LLaVA's
              feature layer at the same B: the reduction as a share of the tower (N = 576).
  memory      weights and peak activation memory per image of one CLIP tower copy (CPU, Linux).
  invariance  B images through tower and reduction one at a time (the encoder's path) against
              one batched forward, and whether the per-image path is bit-identical.
Real-shaped towers, random weights, generated inputs; wall-clock and CPU time after warm-up.
Table to stdout, progress to stderr, JSON to --out.

    python benchmarks/bench_reduction.py --device cpu --threads 1 --out bench_reduction_cpu.json
    python benchmarks/bench_reduction.py --device cuda --out bench_reduction_cuda.json
    python benchmarks/bench_reduction.py memory --dtypes float16,bfloat16 --batch-sizes 1,2,4,8
    python benchmarks/bench_reduction.py invariance --images 4 --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _report
from _cli import HelpFormatter, ints, names

from vllm_prumerge.testing.engine_args import add_number_options

DTYPES = ("float32", "bfloat16", "float16")
TOWERS = ("clip-l-336", "siglip-so400m-384", "tiny")  # tiny: CLIP-L's geometry, 64 wide
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)
# `memory`: glibc serves blocks of 64 KiB and more by mmap and returns freed memory at once, so
# the resident set follows the live tensors (by default it keeps freed blocks, hiding peaks).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# The default measurement: glibc keeps freed megabyte blocks (`tune_malloc`) unless told not to.
MALLOC_HELP = "keep glibc's malloc thresholds; by default freed memory stays in the heap (mmap "
MALLOC_HELP += "threshold 32 MiB, trim 256 MiB): the naive loop's megabyte temporaries are not "
MALLOC_HELP += "page-faulted afresh for every kept token"


# Shared with prefill_transformers.py: timing, the run's record, the front end.


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def measure(fn: Callable[[], object], device: Any, repeats: int, warmup: int = 0) -> dict:
    """Seconds of `fn()` after `warmup` untimed calls, wall clock (device-synchronised) and this
    process's CPU time: medians, minima and samples; on CUDA also the timed calls' peak
    allocated bytes above the start (`peak_bytes`, None elsewhere)."""
    import torch

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = [], []
    for _ in range(max(repeats, 1)):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        **{"median_s": statistics.median(wall), "min_s": min(wall), "samples_s": wall},
        **{"cpu_median_s": statistics.median(cpu), "cpu_min_s": min(cpu), "cpu_samples_s": cpu},
        "peak_bytes": torch.cuda.max_memory_allocated(device) - base if cuda else None,
    }


def environment(**extra: Any) -> dict:
    """The run's `_report.environment` with `extra`, logged."""
    env = _report.environment(extra)
    log(f"environment: {json.dumps(env)}")
    return env


def emit(data: dict, table: str, out: Path | None) -> None:
    """Print the Markdown `table`; write `data` and the table as JSON to `out` (if given)."""
    data["environment"]["load_average_at_end"] = list(os.getloadavg())
    print(table)
    if out:
        _report.write_json(out, {**data, "markdown": table})
        log(f"wrote {out}")


def load_tower(name: str, dtype: Any, device: Any = None) -> tuple[Any, int]:
    """(tower `name` of TOWERS with random weights, LLaVA's feature layer for it)."""
    from vllm_prumerge.testing.towers import FEATURE_LAYER, build_tower

    real = "clip-l-336" if name == "tiny" else name
    return build_tower(real, dtype, device, **(TINY if name == "tiny" else {})), FEATURE_LAYER[real]


def scene_pixels(count: int, seed: int) -> Any:
    """`[count, 3, 336, 336]` CLIP-normalised pixels of generated scenes (`make_scenes`)."""
    import numpy as np
    import torch

    from vllm_prumerge.testing import make_scenes
    from vllm_prumerge.testing.original_format import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    scenes = np.stack(make_scenes(count, seed)).astype(np.float32) / 255.0
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return (torch.from_numpy(scenes).permute(0, 3, 1, 2) - mean) / std


def frontend(tower: Any, batch: int, mode: str, device: Any, repeats: int, warmup: int, seed=0):
    """The plugin's front end on a CLIP `tower` for `batch` generated images: the tower to
    LLaVA's feature layer (-2) plus the reduction in `mode` (`clip_prumerge_inputs` +
    `reduce_tokens`), and the reduction alone (`measure` timings); visual tokens per image."""
    import torch

    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.reduction import reduce_tokens
    from vllm_prumerge.vision import clip_prumerge_inputs

    config, last = PruMergeConfig(mode=mode), {}
    pixels = scene_pixels(batch, seed).to(device, tower.dtype)

    def full() -> Any:
        last.clear()  # the previous run's inputs are no part of this run's memory
        last["inputs"] = clip_prumerge_inputs(tower, pixels, -2)
        return reduce_tokens(*last["inputs"], config)

    with torch.inference_mode():
        for _ in range(warmup):
            full()
        last.clear()
        total = measure(full, device, repeats)
        inputs = last["inputs"]
        alone = measure(lambda: reduce_tokens(*inputs, config), device, repeats, warmup)
        counts = list(reduce_tokens(*inputs, config).host_lengths)
    return {
        **{"batch_size": batch, "mode": mode, "tower_plus_reduction": total, "reduction": alone},
        **{"peak_memory_bytes": total["peak_bytes"], "visual_tokens_per_image": counts},
    }


# The measurements: description and options of each, then how it runs.

TOWER_HELP = "tower shape (tiny: CLIP-L's geometry, 64 wide)"
OPTIONS = {
    "reduction": (
        __doc__,
        ("--device", str, "cpu", "where it runs", ("cpu", "cuda")),
        ("--dtype", str, "float32", "of the inputs and the tower (statistics: float32)", DTYPES),
        ("--batch-sizes", ints, "1,8,32", "comma-separated batch sizes B"),
        ("--patches", ints, "576,2304", "comma-separated patch counts N"),
        ("--width", int, 1024, "feature / key width C"),
        ("--modes", names("prumerge", "prumerge+"), "prumerge,prumerge+", "modes timed"),
        ("--repeats", int, 9, "timed repeats of the batched reduction"),
        ("--naive-repeats", int, 3, "timed repeats of the naive transcription"),
        ("--naive-max-patches", int, 32 * 576, "no naive path (not measured) when B * N exceeds"),
        ("--tower-batch-sizes", ints, None, "tower B (N = 576); unset: --batch-sizes; '': none"),
        ("--tower-repeats", int, 1, "timed repeats of each tower forward"),
        ("--tower-warmup", int, 1, "untimed tower forwards at B = 1 (none at larger B)"),
        ("--warmup", int, 1, "untimed calls before each timed reduction"),
        ("--threads", int, None, "torch.set_num_threads; unset: torch's default"),
        ("--seed", int, 0, "seed of the synthetic inputs"),
    ),
    "memory": (
        "Memory of one CLIP tower copy on a CPU (Linux), each dtype in a fresh process: weights\n"
        "and activations per image (peak growth of the forward; docs/benchmarks.md).",
        ("--tower", str, "clip-l-336", TOWER_HELP, TOWERS[::2]),
        ("--dtypes", names(*DTYPES), "float16,bfloat16", "comma-separated tower dtypes"),
        ("--batch-sizes", ints, "1,2,4,8", "comma-separated batch sizes (images per forward)"),
        ("--repeats", int, 2, "forwards per batch size; the smallest peak is kept"),
        ("--threads", int, 1, "torch threads (vLLM's pre-processor: OMP_NUM_THREADS, default 1)"),
    ),
    "invariance": (
        "What batch invariance costs: each image through tower and reduction alone against one\n"
        "batched forward; whether that is bit-identical alone and in a batch (exit 1 if not).",
        ("--tower", str, "clip-l-336", TOWER_HELP, TOWERS),
        ("--images", int, 4, "images per batch"),
        ("--repeats", int, 2, "timed repeats of each path, after one warm-up"),
        ("--dtype", str, "float32", "tower dtype", DTYPES[:2]),
        ("--threads", int, 1, "torch threads (1: vLLM's pre-processor default)"),
        ("--mode", str, "prumerge", "reduction mode", ("prumerge", "prumerge+")),
    ),
}


class Parser(argparse.ArgumentParser):
    """The default measurement's parser: an argv that starts with `memory` or `invariance` goes
    to that measurement's parser."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        if argv[:1] in (["memory"], ["invariance"]):
            return build_parser(argv[0]).parse_args(argv[1:], namespace)
        return super().parse_args(argv, namespace)


def build_parser(measurement: str = "reduction") -> argparse.ArgumentParser:
    """The parser of `measurement` (a key of OPTIONS); `measurement` in its result names it."""
    description, *specs = OPTIONS[measurement]
    default = measurement == "reduction"
    parser = (Parser if default else argparse.ArgumentParser)(
        prog=None if default else f"bench_reduction.py {measurement}",
        description=description,
        formatter_class=HelpFormatter,
    )
    add_number_options(parser, *specs, ("--out", Path, None, "also write the results as JSON here"))
    parser.set_defaults(measurement=measurement)
    if default:
        parser.epilog = (
            "`bench_reduction.py memory --help`, `... invariance --help`: their options."
        )
        parser.add_argument(
            "--no-malloc-tuning", dest="malloc_tuning", action="store_false", help=MALLOC_HELP
        )
    return parser


def tune_malloc() -> bool:
    """Stop glibc returning freed megabyte blocks to the OS (see `--no-malloc-tuning`)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except OSError:
        return False
    # M_MMAP_THRESHOLD (-3) 32 MiB, M_TRIM_THRESHOLD (-1) 256 MiB
    return bool(mallopt(-3, 32 << 20) and mallopt(-1, 256 << 20))


def reduction_row(args: argparse.Namespace, device: Any, inputs: tuple, mode: str) -> dict:
    """One row of the reduction table: `reduce_tokens` and (unless B * N is too large) the naive
    transcription on the same `inputs` (features, q_cls, keys), in `mode`."""
    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.reduction import reduce_tokens
    from vllm_prumerge.testing.naive_reference import naive_prumerge

    (batch, n, _), config = inputs[0].shape, PruMergeConfig(mode=mode)
    kept = reduce_tokens(*inputs, config).num_kept.float()
    fast = measure(lambda: reduce_tokens(*inputs, config), device, args.repeats, args.warmup)
    row = {"mode": mode, "batch": batch, "patches": n, "width": args.width}
    row.update(mean_kept=float(kept.mean()), min_kept=int(kept.min()), max_kept=int(kept.max()))
    row.update(fast=fast, naive=None, speedup=None, speedup_cpu=None)
    text = "naive not measured"
    if batch * n <= args.naive_max_patches:

        def naive() -> None:
            for f, q, k in zip(*inputs, strict=True):
                naive_prumerge(f, q, k, plus=mode == "prumerge+")

        row["naive"] = slow = measure(naive, device, args.naive_repeats, args.warmup)
        # Minimum times: the least disturbed by other load on a shared machine.
        row["speedup"], row["speedup_cpu"] = (slow[k] / fast[k] for k in ("min_s", "cpu_min_s"))
        text = f"naive {slow['min_s'] * 1e3:9.1f} ms  x{row['speedup']:.1f}"
    text = f"kept~{row['mean_kept']:.0f}  fast {fast['min_s'] * 1e3:8.2f} ms  {text}"
    log(f"reduction {mode:9s} B={batch:<3d} N={n:<5d} {text}")
    return row


def bench_tower(args: argparse.Namespace, device: Any) -> list[dict]:
    """The tower forward (to LLaVA's feature layer: `frontend` in mode off) at each B."""
    import torch

    log("building a random-weight CLIP ViT-L/14-336 tower")
    tower, _ = load_tower("clip-l-336", getattr(torch, args.dtype), device)
    if args.tower_warmup:
        frontend(tower, 1, "off", device, args.tower_warmup, 0)
    rows = []
    for batch in args.tower_batch_sizes:
        forward = frontend(tower, batch, "off", device, args.tower_repeats, 0, args.seed)
        forward = forward["tower_plus_reduction"]
        log(f"tower forward B={batch:<3d} {forward['median_s'] * 1e3:10.1f} ms")
        attn = tower.config._attn_implementation
        rows.append({"batch": batch, "attn_implementation": attn, "forward": forward})
    return rows


REDUCTION_HEADER = ["mode", "B", "N", "kept (mean)", "reduction wall / CPU", "naive wall / CPU"]
REDUCTION_HEADER += ["speed-up wall / CPU", "tower fwd wall / CPU", "reduction / tower wall / CPU"]


def reduction_table(results: dict) -> str:
    """The measured table (milliseconds, minima); cells that were not measured say so."""
    towers = {row["batch"]: row["forward"] for row in results["tower"]}

    def ms(timing: dict, digits: int) -> str:
        return " / ".join(f"{timing[key] * 1e3:.{digits}f}" for key in ("min_s", "cpu_min_s"))

    rows = []
    for row in results["reduction"]:
        fast, naive = row["fast"], row["naive"]
        tower = towers.get(row["batch"]) if row["patches"] == 576 else None
        share = (
            [f"{100 * fast[k] / tower[k]:.3f}%" for k in ("min_s", "cpu_min_s")] if tower else []
        )
        speedup = f"{row['speedup']:.1f}x / {row['speedup_cpu']:.1f}x" if naive else "-"
        cells = [row["mode"], row["batch"], row["patches"], f"{row['mean_kept']:.1f}", ms(fast, 2)]
        cells += [ms(naive, 1) if naive else "not measured", speedup]
        rows.append([*cells, ms(tower, 0) if tower else "-", " / ".join(share) or "-"])
    return _report.markdown_table(REDUCTION_HEADER, rows)


def run_reduction(args: argparse.Namespace) -> int:
    import torch

    from vllm_prumerge.testing.naive_reference import synthetic_inputs

    if args.tower_batch_sizes is None:
        args.tower_batch_sizes = list(args.batch_sizes)
    malloc_tuned = tune_malloc() if args.malloc_tuning else False
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        build_parser().error("--device cuda: no CUDA device available")
    env = environment(device=str(device), dtype=args.dtype, malloc_tuned=malloc_tuned)
    rows = []
    with torch.inference_mode():
        for n, batch in itertools.product(args.patches, args.batch_sizes):
            inputs = synthetic_inputs(batch, n, args.width, "clip", seed=args.seed, dtype=dtype)
            inputs = tuple(t.to(device) for t in inputs)
            rows += [reduction_row(args, device, inputs, mode) for mode in args.modes]
    tower = bench_tower(args, device) if args.tower_batch_sizes else []
    results = {"environment": env, "reduction": rows, "tower": tower}
    emit(results, reduction_table(results), args.out)
    return 0


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))


def tower_memory(args: argparse.Namespace, dtype_name: str, batch_sizes: list[int]) -> dict:
    """Weights and per-batch peak forward memory of one tower in `dtype_name` (this process),
    and the activations per image: the least-squares slope of the peak over the batch size."""
    import gc

    import torch

    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.reduction import reduce_tokens
    from vllm_prumerge.vision import clip_prumerge_inputs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    tower, _ = load_tower(args.tower, dtype)
    gc.collect()
    rss_tower = _status_kib("VmRSS")

    def forward(batch: int) -> list:
        pixels = torch.randn(batch, 3, 336, 336, dtype=dtype)
        return reduce_tokens(*clip_prumerge_inputs(tower, pixels, -2), PruMergeConfig()).split()

    peaks = {}
    with torch.inference_mode():
        forward(1)  # one-time set-up of kernels and thread pools, not counted
        for batch in batch_sizes:
            samples = []
            for _ in range(args.repeats):
                gc.collect()
                before = _status_kib("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
                forward(batch)
                samples.append(_status_kib("VmHWM") - before)
            peaks[batch] = min(samples) * 1024
    params, (xs, ys) = list(tower.parameters()), zip(*peaks.items(), strict=True)
    per_image = statistics.linear_regression(xs, ys).slope if len(xs) > 1 else ys[0] / xs[0]
    return {
        **{"dtype": dtype_name, "threads": torch.get_num_threads()},
        "param_count": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "rss_growth_building_tower_bytes": (rss_tower - rss_before) * 1024,
        "forward_peak_extra_bytes": peaks,
        "activation_bytes_per_image": per_image,
    }


def run_memory(args: argparse.Namespace) -> int:
    batch_sizes = sorted(set(args.batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1 or args.repeats < 1 or args.threads < 1:
        build_parser("memory").error("--batch-sizes, --repeats and --threads must be >= 1")
    if not Path("/proc/self/clear_refs").exists():
        build_parser("memory").error("this measurement needs Linux's /proc/self/clear_refs")
    # A fresh interpreter per dtype, started with the malloc settings and the thread count.
    os.environ.update(MALLOC_ENV, OMP_NUM_THREADS=str(args.threads))
    results = []
    for dtype in args.dtypes:
        log(f"memory {dtype} ...")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results.append(pool.apply(tower_memory, (args, dtype, batch_sizes)))
    header = ["dtype", "parameters", "weights (exact)", "RSS growth, building"]
    header += [f"forward peak, B={b}" for b in batch_sizes] + ["activations per image (slope)"]
    rows = []
    for r in results:
        sizes = [r["param_bytes"], r["rss_growth_building_tower_bytes"]]
        sizes += [*r["forward_peak_extra_bytes"].values(), r["activation_bytes_per_image"]]
        rows.append([r["dtype"], f"{r['param_count'] / 1e6:.1f} M"])
        rows[-1] += [f"{v / 2**20:.0f} MiB" for v in sizes]
    env = environment(threads=args.threads)
    emit({"environment": env, "results": results}, _report.markdown_table(header, rows), args.out)
    return 0


def run_invariance(args: argparse.Namespace) -> int:
    import torch

    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.reduction import core
    from vllm_prumerge.vision import tower_scores

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, config = getattr(torch, args.dtype), PruMergeConfig(mode=args.mode)
    tower, layer = load_tower(args.tower, dtype)
    size = tower.config.image_size
    pixels = torch.randn(args.images, 3, size, size, dtype=dtype)

    def batched(images: Any) -> Any:  # the old path: one forward of the batch, one reduction
        return core._reduce_one(*tower_scores(tower, images, layer), config)

    def per_image(images: Any) -> Any:  # PruMergeEncoder.encode: each image alone
        return core.ReducedTokens.concat([batched(row) for row in images.split(1)])

    env = environment()
    log(f"{args.tower}, {args.dtype}, {args.threads} thread(s), {args.images} images, {args.mode}")
    results = {}
    with torch.inference_mode():
        for path, fn in (("batched", batched), ("per_image", per_image)):
            timing = measure(lambda fn=fn: fn(pixels), torch.device("cpu"), args.repeats, 1)
            results[path] = {"wall_s": timing["min_s"], "cpu_s": timing["cpu_min_s"]}
        parts = per_image(pixels).split()
        alone = [per_image(pixels[i : i + 1]).features for i in range(args.images)]
    identical = all(torch.equal(a, b) for a, b in zip(alone, parts, strict=True))
    ratio = results["per_image"]["cpu_s"] / results["batched"]["cpu_s"]
    rows = [
        [p] + [f"{r[k] / args.images:.3f}" for k in ("cpu_s", "wall_s")] for p, r in results.items()
    ]
    table = _report.markdown_table(["path", "CPU s / image", "wall s / image"], rows)
    table += f"\nper-image / batched CPU time: {ratio:.3f}; per-image path bit-identical alone "
    table += f"and in the batch: {identical}"
    report = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
    report.update(results=results, per_image_over_batched_cpu=ratio, bit_identical=identical)
    emit(report, table, args.out)
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return globals()[f"run_{args.measurement}"](args)


if __name__ == "__main__":
    raise SystemExit(main())
