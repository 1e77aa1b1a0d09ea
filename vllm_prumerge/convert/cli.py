"""`vllm-prumerge convert` / `python -m vllm_prumerge.convert`: arguments and entry point."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

DESCRIPTION = """\
Convert the authors' fine-tuned PruMerge checkpoints (original LLaVA training format: a PEFT
LoRA adapter plus non_lora_trainables.bin on top of Vicuna and OpenAI's CLIP), or a full
original-format LLaVA-1.5 checkpoint, into one llava-hf LLaVA-1.5 checkpoint that
`vllm serve DIR --plugin prumerge` serves in the PruMerge mode recorded in its config.

The LoRA is merged exactly as PEFT defines it (scaling alpha/r, or alpha/sqrt(r) with
use_rslora; rank/alpha patterns) in float32, tensor by tensor, then cast to --dtype. Nothing is
written to --out unless every input checks out: the checkpoint is built in a temporary folder
next to --out and renamed at the end."""

EPILOG = """\
examples:
  vllm-prumerge convert --base lmsys/vicuna-7b-v1.5 \\
      --lora yuzhang/llava-prumerge-vicuna-7b-v1.5-lora \\
      --vision openai/clip-vit-large-patch14-336 --out llava-prumerge-7b
  vllm-prumerge convert --base ./vicuna-7b-v1.5 --lora ./llava-prumerge-plus-vicuna-7b-v1.5-lora \\
      --vision ./clip-vit-large-patch14-336 --mode prumerge+ --out llava-prumerge-plus-7b
  vllm-prumerge convert --base liuhaotian/llava-v1.5-7b --out llava-v1.5-7b --mode prumerge+
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        metavar="BASE",
        help="The base language model the adapter was trained on: a Hugging Face folder or hub "
        "id (lmsys/vicuna-7b-v1.5, lmsys/vicuna-13b-v1.5), with config.json, weights "
        "(safetensors or .bin, sharded or not) and its LLaMA tokenizer. Without --lora: a full "
        "original-format LLaVA checkpoint (e.g. liuhaotian/llava-v1.5-7b), converted without "
        "a merge.",
    )
    parser.add_argument(
        "--lora",
        metavar="LORA",
        help="The LLaVA LoRA training output: a folder or hub id with adapter_config.json, "
        "adapter_model.bin or .safetensors, non_lora_trainables.bin (the mlp2x_gelu "
        "projector) and LLaVA's config.json, e.g. yuzhang/llava-prumerge-vicuna-7b-v1.5-lora.",
    )
    parser.add_argument(
        "--vision",
        metavar="VISION",
        help="The CLIP vision tower: a folder or hub id in OpenAI CLIP's Hugging Face layout "
        "(openai/clip-vit-large-patch14-336). Default: mm_vision_tower of LLaVA's config.json.",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="Folder to write the llava-hf checkpoint to. Refused if it exists and is not "
        "empty, unless --overwrite.",
    )
    parser.add_argument(
        "--mode",
        default="prumerge",
        metavar="MODE",
        help="PruMerge mode the checkpoint was fine-tuned for, recorded in config.json as "
        '"prumerge": {"mode": MODE} and used by --plugin prumerge when no --prumerge-mode is '
        "given: prumerge (the -vicuna-*-lora adapters), prumerge+ (the -plus- adapter) or off. "
        "Default: prumerge.",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="dtype of the written weights (the merge itself is always float32). "
        "Default: the base model's dtype (float16 for Vicuna).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a non-empty --out; the old folder is removed only after the new "
        "checkpoint is complete.",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="Largest safetensors file to write (e.g. 5GB, 500MB); a model.safetensors."
        "index.json maps keys to files. Memory use does not depend on it (tensors are "
        "streamed one at a time). Default: 5GB.",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="No progress bar (by default one is shown on a terminal).",
    )


def build_parser(prog: str = "vllm-prumerge convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert as `args` say; print a summary, or one error line and return 1."""
    from vllm_prumerge.convert.converter import ConversionError, convert
    from vllm_prumerge.convert.writer import parse_size

    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as exc:
        print(f"error: --max-shard-size: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = convert(
                base=args.base,
                lora=args.lora,
                vision=args.vision,
                out=args.out,
                mode=args.mode,
                dtype=args.dtype,
                overwrite=args.overwrite,
                max_shard_size=max_shard,
                progress=False if args.no_progress else None,
            )
        except ConversionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            for warning in caught:
                if warning.filename.startswith(_PACKAGE_DIR):  # ours, not transformers' chatter
                    print(f"warning: {warning.message}", file=sys.stderr)
    merged = f"{result.merged_modules} LoRA layers merged, " if result.merged_modules else ""
    print(
        f"wrote {result.out}: {result.tensors} tensors in {result.shards} shard(s), "
        f"{merged}dtype {result.dtype}, vocabulary {result.vocab_size} "
        f"(<image> = {result.image_token_id}), PruMerge mode {result.mode}"
    )
    print(f"serve it with: vllm serve {result.out} --plugin prumerge")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser("python -m vllm_prumerge.convert").parse_args(argv))
