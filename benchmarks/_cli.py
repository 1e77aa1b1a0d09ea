"""Command-line options shared by the benchmark scripts: the model (`--model` or a generated
checkpoint), the workload, the compared configurations and the output folder (the engine's
options: `vllm_prumerge.testing.engine_args`). Nothing here imports vLLM: `--help` and input
errors stay instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from _common import default_configs, parse_configs
from _report import BASELINE_RULE

from vllm_prumerge.testing.engine_args import add_number_options
from vllm_prumerge.testing.scenes import VIDEO_KINDS
from vllm_prumerge.testing.workload import FAMILIES, SYNTHETIC_SPECS, TOWERS, synthetic_checkpoint


def new_parser(doc: str, summary: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph + `summary` as the description, every
    option's default shown in --help."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0] + " " + summary,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_model_arguments(group: Any, model_help: str) -> None:
    """--model (`model_help`), then --synthetic, --family, --tower: the generated checkpoint
    used when --model is not given."""
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument(
        "--synthetic",
        choices=sorted(SYNTHETIC_SPECS),
        default="small",
        help="Size of the generated random-weight checkpoint used without --model: tiny (the "
        "tests'), small (a 512-wide 4-layer Llama: prompt length shows in the cost on a CPU), "
        "medium (1024-wide, 8 layers); all with the family's real image geometry.",
    )
    group.add_argument(
        "--family",
        choices=FAMILIES,
        default="llava",
        help="Family of the generated checkpoint: llava (LLaVA-1.5: CLIP 336/14), llava_next "
        "(anyres tiles of 576 patches), siglip (SigLIP-LLaVA: 384/14, 729 patches, no CLS), "
        "onevision (SigLIP per anyres crop; images and videos), next_video (LLaVA-NeXT-Video: "
        "videos only), video_llava (images and videos). With --model: the checkpoint's own.",
    )
    group.add_argument(
        "--tower",
        choices=TOWERS,
        default="preset",
        help="Vision tower of the generated checkpoint: preset (the --synthetic size's) or "
        "real (the family's production shape, CLIP ViT-L/14-336 or SigLIP-so400m, random "
        "weights), so that the front end costs what it costs in production.",
    )


def checkpoint(args: Any) -> tuple[str, dict[str, Any] | None]:
    """(path, generated spec) of the run's model: --model as given (spec None), or the generated
    checkpoint of --synthetic, --family and --tower."""
    if getattr(args, "model", None):
        return args.model, None
    return synthetic_checkpoint(args.synthetic, args.family, args.tower)


def model_label(args: Any) -> str:
    """How a run's model is named in reports: the --model given, or the generated preset."""
    if getattr(args, "model", None):
        return args.model
    tower = "+real-tower" if args.tower == "real" else ""
    return f"generated:{args.synthetic}{tower} ({args.family})"


def parse_size(text: str) -> tuple[int, int]:
    """`"672x672"` -> (672, 672) (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size must be WIDTHxHEIGHT, e.g. 672x672, got {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {text!r}")
    return width, height


def add_image_size_argument(group: Any, help: str | None = None) -> None:
    """`--image-size WxH` of the generated scenes (default 336x336)."""
    group.add_argument(
        "--image-size",
        type=parse_size,
        default=(336, 336),
        metavar="WxH",
        help=help or "Size of the generated scenes (e.g. 672x672: a 2x2 grid of LLaVA-NeXT tiles).",
    )


def add_workload_arguments(group: Any, seed_help: str) -> None:
    """The request workload of throughput.py and serving.py: `--num-prompts`, `--output-len`,
    `--seed` (`seed_help`: what it seeds), `--images DIR` and `--image-size WxH`."""
    add_number_options(
        group,
        ("--num-prompts", int, 64, "Measured requests per configuration (each: one image, or "
         "one video with --frames, + one question)."),
        ("--output-len", int, 32, "Generated tokens per request (fixed: EOS ignored, greedy)."),
        ("--seed", int, 0, seed_help),
    )  # fmt: skip
    group.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="Use the images in DIR (png/jpg/webp/..., name order, cycled) instead of generated "
        "scenes of shapes, text and gradients.",
    )
    add_image_size_argument(group)
    group.add_argument(
        "--frames",
        type=int,
        default=0,
        metavar="N",
        help="0: every request sends one image. N > 0: one video of N frames instead "
        "(offline: multi_modal_data; server: an MP4 video_url): generated (--video-kind), or "
        "N consecutive images of --images. Needs a checkpoint that takes videos. Counts are "
        "then per video (each frame reduced on its own unless a temporal configuration says "
        "otherwise); long videos may need a larger --max-model-len.",
    )
    group.add_argument(
        "--video-kind",
        choices=VIDEO_KINDS,
        default="panning",
        help="With --frames, the generated videos: a camera panning across one scene, one "
        "scene held (static), or a cut half-way to another scene; what a temporal "
        "configuration (e.g. prumerge+/adaptive) can drop depends on it.",
    )


def add_output_arguments(parser: Any, default: str, folder_help: str, plots: str | None) -> Any:
    """The "output" group: `--out DIR` (default `default`; `folder_help` says what it holds),
    `--no-plots` when the script draws `plots` (e.g. "PNG plots"), and `--no-progress`."""
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=default, metavar="DIR", help=folder_help)
    if plots:
        out.add_argument("--no-plots", action="store_true", help=f"Skip the {plots}.")
    out.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return out


def add_comparison_arguments(group: Any, *, stock: str, repeats: int, pooling: str) -> None:
    """`--configs` (`stock`: what the stock configuration(s) are), `--text`, `--warmup` and
    `--repeats` (default `repeats`; `pooling`: how repeats are combined) of the scripts that
    compare configurations on one workload (throughput.py, serving.py)."""
    group.add_argument(
        "--configs",
        default=None,
        help="Comma-separated configurations: off (the stock visual-token count through the "
        "plugin's code path), prumerge, prumerge+, fixed:N (N patches + 1 extra token), fixed:Ns "
        "(with PruMerge+ spatial samples), fixed:RATIO (e.g. fixed:0.25); for videos a reducing "
        "one followed by /evs[:RATE] or /adaptive[:THRESHOLD] (e.g. prumerge+/adaptive) reduces "
        f"across time first; and {stock}. {BASELINE_RULE} Default: {default_configs(0)}; with "
        f"--frames: {default_configs(1)} (budgets per frame).",
    )
    group.add_argument(
        "--text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure every configuration's text-equivalent (text@CONFIG: the same requests "
        "with the visual tokens replaced by text tokens, exactly the same prompt length and "
        "output length), the limit a request with an image or video can reach.",
    )
    group.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="Warm-up requests per configuration (on other images), run and discarded right "
        "before its measured requests; a first round of every configuration precedes all.",
    )
    group.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"Measure every configuration this many times (order rotated each round); {pooling}.",
    )


def check_comparison(parser: Any, args: Any, *, stock_dtypes: bool) -> list:
    """The workload's and comparison's numbers checked (a parser error otherwise) and
    `args.configs` (default: `default_configs`) parsed into `BenchConfig`s."""
    if args.num_prompts < 1 or args.output_len < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--num-prompts, --output-len and --repeats must be >= 1, --warmup >= 0")
    if args.frames < 0:
        parser.error("--frames must be >= 0 (0: images)")
    args.configs = args.configs or default_configs(args.frames)
    try:
        return parse_configs(args.configs, stock=True, stock_dtypes=stock_dtypes)
    except ValueError as exc:
        parser.error(str(exc))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every default."""


def ints(text: str) -> list[int]:
    """`"1,8,32"` -> [1, 8, 32] (an argparse type)."""
    return [int(part) for part in text.split(",") if part.strip()]


def names(*choices: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of `choices`."""

    def parse(text: str) -> list[str]:
        items = [i.strip().lower().replace("_plus", "+") for i in text.split(",") if i.strip()]
        if not items or not set(items) <= set(choices):
            raise argparse.ArgumentTypeError(f"takes {', '.join(choices)}, got {text!r}")
        return items

    return parse
