"""Helpers shared by the example scripts (not an example itself).

Command-line pieces every example uses the same way: which checkpoint (`--model` or `--tiny`),
which reduction (`--mode`, `--budget`, `--option KEY=VALUE`), vLLM engine settings (the
benchmarks' group), and finding and opening images (`vllm_prumerge.testing`'s, their one home).
Nothing here imports vLLM, so `--help` and input errors are instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vllm_prumerge.testing import engine_args
from vllm_prumerge.testing.engine_args import resolve_model, use_cpu_if_no_gpu
from vllm_prumerge.testing.images import IMAGE_SUFFIXES, find_images, open_image

# The examples' image helpers and engine set-up, from their one home.
__all__ = ["IMAGE_SUFFIXES", "find_images", "open_image", "use_cpu_if_no_gpu"]
# LLaVA-1.5's conversation format (llava-hf/llava-1.5-*-hf): one image, one question.
DEFAULT_PROMPT = "USER: <image>\n{question} ASSISTANT:"
DEFAULT_QUESTION = "What is shown in this image?"
MODES = ("prumerge", "prumerge+", "fixed", "off")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- which checkpoint -------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--model",
        help="A checkpoint of a supported LLaVA family (README: Supported checkpoints): a Hugging "
        "Face hub id (e.g. llava-hf/llava-1.5-7b-hf) or a local folder in the hub layout. Offline "
        "prompts use LLaVA-1.5's 'USER: <image>\\n... ASSISTANT:' format.",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="Use the generated tiny LLaVA-1.5-shaped checkpoint (random weights, made once and "
        "cached in ~/.cache/vllm-prumerge or $VLLM_PRUMERGE_CACHE): runs offline on any "
        "machine; token counts are real, answers are gibberish.",
    )


def checkpoint_of(args: argparse.Namespace) -> str:
    """The checkpoint to load: `--model` as given, or the tiny checkpoint's folder."""
    return resolve_model(None if args.tiny else args.model)


# --- which reduction --------------------------------------------------------------------------


def add_reduction_arguments(parser: argparse.ArgumentParser, *, mode_default: str | None) -> None:
    """`--mode` (unless the script adds its own), `--budget`, `--budget-ratio`, `--option`."""
    if mode_default is not None:
        parser.add_argument(
            "--mode",
            default=mode_default,
            choices=MODES,
            help="Reduction mode: prumerge (adaptive, ~32 of 576 tokens per image on "
            "LLaVA-1.5-7B), prumerge+ (adaptive + spatial samples, ~144), fixed (keep "
            "--budget or --budget-ratio tokens) or off (stock LLaVA, 576). "
            f"Default: {mode_default}.",
        )
    parser.add_argument(
        "--budget", type=int, default=None, help="fixed mode: tokens to keep per image."
    )
    parser.add_argument(
        "--budget-ratio",
        type=float,
        default=None,
        help="fixed mode: fraction of the 576 patches to keep (instead of --budget).",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any other PruMergeConfig option, repeatable: iqr_multiplier, k_neighbors, "
        "merge_weighting (reference|normalized), order (reference|raster), min_tokens, "
        "spatial_samples (fixed mode). E.g. --option iqr_multiplier=2.0.",
    )


def reduction_options(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """`mode` plus the options given on the command line, validated by PruMergeConfig.

    The fixed-budget options are dropped for the other modes, so one command line can cover
    several modes. Raises ValueError naming the bad option.
    """
    from vllm_prumerge import PruMergeConfig

    options: dict[str, Any] = {"mode": mode}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    if args.budget is not None:
        options["budget"] = args.budget
    if args.budget_ratio is not None:
        options["budget_ratio"] = args.budget_ratio
    if mode.strip().lower() != "fixed":
        for key in ("budget", "budget_ratio", "spatial_samples"):
            options.pop(key, None)
    return PruMergeConfig.from_dict(options).to_dict()


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompt-template, --max-tokens and --temperature, shared by the vLLM examples."""
    parser.add_argument(
        "--prompt-template",
        default=DEFAULT_PROMPT,
        help=f"prompt with one <image> and a {{question}} field. Default: {DEFAULT_PROMPT!r}.",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens to generate per answer. Default: 64."
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature. Default: 0 (greedy)."
    )


# --- the vLLM engine --------------------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' "vLLM engine" options (`vllm_prumerge.testing.engine_args`), with the
    examples' one difference: --max-num-seqs 8 (a few prompts, a small batch)."""
    engine_args.add_engine_arguments(parser, max_num_seqs=8)


def engine_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`, PruMerge's excluded (see `engine_kwargs`)."""
    return {"limit_mm_per_prompt": {"image": 1}, **engine_args.engine_settings(args)}
