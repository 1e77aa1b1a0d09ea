"""What batch invariance costs: the tower and the reduction of B images batched vs one at a time.

Since issue 18 the encoder runs every image (crop, frame) through the tower and the reduction
alone, so its features are bit-identical in any company. This script measures what that costs
against the old batched path (one tower forward of [B] and one padded reduction), on a
real-shaped tower with random weights (CLIP-L/14-336 or SigLIP-so400m/14-384; no download), and
checks that the per-image path is bit-identical alone and in the batch.

    python benchmarks/batch_invariance_cost.py --images 4 --dtype float32 --threads 1

Prints the CPU model and its native-bfloat16 instruction sets with the figures; compare only
figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from vllm_prumerge import PruMergeConfig
from vllm_prumerge.reduction import core
from vllm_prumerge.testing.engine_args import add_number_options
from vllm_prumerge.testing.towers import FEATURE_LAYER, TOWER_SHAPES, build_tower
from vllm_prumerge.vision import tower_scores
from vllm_prumerge.vision.precision import cpu_description

# The real-shaped towers (random weights), and for the smoke test CLIP-L's geometry (336 px, 576
# patches + CLS) at a tiny width and depth.
TOWERS = {
    **{name: (FEATURE_LAYER[name], name, {}) for name in TOWER_SHAPES},
    "tiny": (-2, "clip-l-336", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        projection_dim=32,
    )),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tower",
        choices=sorted(TOWERS),
        default="clip-l-336",
        help="real-shaped tower with random weights (default clip-l-336)",
    )
    add_number_options(
        parser,
        ("--images", int, 4, "images per batch (default 4)"),
        ("--repeats", int, 2, "timed repeats of each path, after one warm-up (default 2)"),
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="tower dtype (default float32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: vLLM's pre-processor default)",
    )
    parser.add_argument(
        "--mode",
        default="prumerge",
        choices=["prumerge", "prumerge+"],
        help="reduction mode (default prumerge)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    return parser  # fmt: skip


def batched(tower, pixels, layer, config):
    """The old path: one forward of the whole batch, one padded reduction."""
    return core._reduce_one(*tower_scores(tower, pixels, layer), config)


def per_image(tower, pixels, layer, config):
    """Today's path (PruMergeEncoder.encode): each image alone through tower and reduction."""
    return core.ReducedTokens.concat(
        [core._reduce_one(*tower_scores(tower, row, layer), config) for row in pixels.split(1)]
    )


def timed(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": min(wall), "cpu_s": min(cpu)}


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer, name, overrides = TOWERS[args.tower]
    dtype = getattr(torch, args.dtype)
    tower = build_tower(name, dtype, **overrides)
    size = tower.config.image_size
    pixels = torch.randn(args.images, 3, size, size, dtype=dtype)
    config = PruMergeConfig(mode=args.mode)
    print(cpu_description(), f"| load average at start {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"{args.tower}, {args.dtype}, {args.threads} thread(s), {args.images} images, "
          f"{args.mode}; best of {args.repeats}", file=sys.stderr)  # fmt: skip

    results = {}
    for name, fn in (("batched", batched), ("per_image", per_image)):
        results[name] = timed(lambda fn=fn: fn(tower, pixels, layer, config), args.repeats)
        per = {k: v / args.images for k, v in results[name].items()}
        print(f"{name:>10}: {per['cpu_s']:.3f} s CPU / image, {per['wall_s']:.3f} s wall / image",
              file=sys.stderr)  # fmt: skip
    ratio = results["per_image"]["cpu_s"] / results["batched"]["cpu_s"]
    print(f"per-image / batched CPU time: {ratio:.3f}", file=sys.stderr)

    together = per_image(tower, pixels, layer, config)
    identical = all(
        torch.equal(per_image(tower, pixels[i : i + 1], layer, config).features, part)
        for i, part in enumerate(together.split())
    )
    print(f"per-image path bit-identical alone and in the batch: {identical}", file=sys.stderr)
    report = {
        "machine": cpu_description(),
        "load_average_at_start": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "per_image_over_batched_cpu": ratio,
        "bit_identical": identical,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
