"""Memory of one CLIP ViT-L/14-336 tower copy: weights, and activations per image (CPU).

Every API-server process of `vllm serve --plugin prumerge --api-server-count N` holds its own
tower (the pre-processor runs it), so N processes cost N times the weights, plus the activations
of the batch each one is encoding. This script measures both for the real CLIP-L/14-336 geometry
(24 layers, width 1024, 16 heads, MLP 4096, 336 px / patch 14 = 576 patches + CLS; random
weights, nothing downloaded), built the way the plugin builds it (transformers
`CLIPVisionModel`, SDPA attention, in the engine's dtype) and run through the plugin's own path
(`clip_prumerge_inputs` + `reduce_tokens`, mode prumerge).

Method (Linux): each dtype runs in a fresh child process. Weights: the parameters' bytes
(numel x element size; exact), and the resident-set growth while building the tower. Activations:
before each forward the process's peak resident set size (VmHWM) is reset to the current size by
writing 5 to /proc/self/clear_refs; after the forward, VmHWM minus the size before it is the
forward's peak extra memory. It is measured at several batch sizes B, after one uncounted warm-up
forward; the per-image figure is the least-squares slope over B. PyTorch's CPU allocator frees
to malloc, and glibc is told to return freed blocks to the OS at once
(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so the figure is the peak of live
tensors plus allocator overhead; a GPU allocator's figure will differ.

    python benchmarks/tower_memory.py --dtypes float16,bfloat16 --batch-sizes 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
MIB = 2**20
# glibc malloc: serve every block of 64 KiB and more by mmap and give freed memory back at once,
# so that the resident set follows the live tensors (by default glibc raises its mmap threshold
# after large frees and keeps freed blocks resident, hiding later peaks).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(dtype_name: str, batch_sizes: list[int], repeats: int) -> dict:
    """Weights and per-batch peak forward memory of one tower in `dtype_name` (this process)."""
    import gc

    import torch

    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.reduction import reduce_tokens
    from vllm_prumerge.testing.towers import build_tower
    from vllm_prumerge.vision.clip import clip_prumerge_inputs

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    # openai/clip-vit-large-patch14-336, the tower of llava-hf/llava-1.5-7b-hf.
    tower = build_tower("clip-l-336", dtype)
    gc.collect()
    rss_tower = _status_kib("VmRSS")
    param_bytes = sum(p.numel() * p.element_size() for p in tower.parameters())
    prumerge = PruMergeConfig()
    with torch.inference_mode():  # one-time set-up of kernels and thread pools, not counted
        reduce_tokens(*clip_prumerge_inputs(tower, torch.randn(1, 3, 336, 336, dtype=dtype), -2))
    peaks = {}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, 336, 336, dtype=dtype)
        samples = []
        for _ in range(repeats):
            gc.collect()
            before = _status_kib("VmRSS")
            _reset_peak()
            with torch.inference_mode():
                reduced = reduce_tokens(*clip_prumerge_inputs(tower, pixels, -2), prumerge)
                features = reduced.split()
            samples.append(_status_kib("VmHWM") - before)
            del reduced, features
        peaks[batch] = min(samples) * 1024
    return {
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "param_count": sum(p.numel() for p in tower.parameters()),
        "param_bytes": param_bytes,
        "rss_growth_building_tower_bytes": (rss_tower - rss_before) * 1024,
        "forward_peak_extra_bytes": peaks,
    }


def slope(points: dict[int, int]) -> float:
    """Least-squares slope of bytes over batch size."""
    xs, ys = list(points), list(points.values())
    if len(xs) < 2:
        return float(ys[0]) / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dtypes",
        default="float16,bfloat16",
        help=f"comma-separated tower dtypes, of {', '.join(DTYPES)}. Default: float16,bfloat16.",
    )
    parser.add_argument(
        "--batch-sizes",
        default="1,2,4,8",
        help="comma-separated batch sizes (images per forward). Default: 1,2,4,8.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="forwards per batch size; the smallest peak is kept. Default: 2.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (vLLM's pre-processor uses OMP_NUM_THREADS, default 1). Default: 1.",
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError as exc:
        parser.error(f"--batch-sizes: {exc}")
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes takes {', '.join(DTYPES)}, got {args.dtypes!r}")
    if not batch_sizes or batch_sizes[0] < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--batch-sizes, --repeats and --threads must be >= 1")
    if not Path("/proc/self/clear_refs").exists():
        parser.error("this measurement needs Linux's /proc/self/clear_refs")

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, batch_sizes, args.repeats)))
        return 0

    results = []
    for dtype in dtypes:
        print(f"[tower_memory] {dtype} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [
                *[sys.executable, __file__, "--child", dtype, "--batch-sizes", args.batch_sizes],
                *["--repeats", str(args.repeats), "--threads", str(args.threads)],
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)},
        )
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peaks = {int(b): v for b, v in result["forward_peak_extra_bytes"].items()}
        result["forward_peak_extra_bytes"] = peaks
        result["activation_bytes_per_image"] = slope(peaks)
        results.append(result)

    print(
        "| dtype | parameters | weights (exact) | RSS growth, building | "
        + " | ".join(f"forward peak, B={b}" for b in batch_sizes)
        + " | activations per image (slope) |"
    )
    print("|---" * (5 + len(batch_sizes)) + "|")
    for r in results:
        peaks = r["forward_peak_extra_bytes"]
        print(
            f"| {r['dtype']} | {r['param_count'] / 1e6:.1f} M | {r['param_bytes'] / MIB:.0f} MiB "
            f"| {r['rss_growth_building_tower_bytes'] / MIB:.0f} MiB | "
            + " | ".join(f"{peaks[b] / MIB:.0f} MiB" for b in batch_sizes)
            + f" | {r['activation_bytes_per_image'] / MIB:.0f} MiB |"
        )
    if args.out:
        import torch
        import transformers

        meta = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        }
        Path(args.out).write_text(json.dumps({"environment": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
