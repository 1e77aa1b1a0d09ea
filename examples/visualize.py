"""See which patches PruMerge keeps, samples and merges, and how token counts spread over images.

No vLLM needed: the checkpoint's CLIP tower runs through `vllm_prumerge.encoder.PruMergeEncoder`
and the figures come from `vllm_prumerge.vis`.

    # one PNG (+ JSON with the numbers) per image: the 24x24 grid with kept outliers, PruMerge+
    # spatial samples, and the kept token each pruned patch merged into most strongly
    python examples/visualize.py tokens --tiny --mode prumerge+ --out-dir vis inputs/scene_00.png

    # a histogram of tokens per image over a folder, one series per mode (+ counts JSONL)
    python examples/visualize.py histogram --tiny --modes prumerge prumerge+ --out vis/h.png inputs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run `visualize.py tokens --help` / `visualize.py histogram --help` for options.",
    )
    shared = argparse.ArgumentParser(add_help=False)
    common.add_model_arguments(shared)
    shared.add_argument(
        "--device",
        default=None,
        help="Torch device of the vision tower (cuda, cpu, ...). Default: cuda if available.",
    )
    shared.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Dtype of the vision tower (the reduction's statistics are float32 regardless). "
        "Default: float32.",
    )
    shared.add_argument(
        "--batch-size", type=int, default=8, help="Images per tower forward. Default: 8."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tokens = commands.add_parser(
        "tokens",
        parents=[shared],
        help="one token-map PNG per image",
        description="For each image, write OUT_DIR/<name>.tokens.png (three panels: kept "
        "outliers and spatial samples on the 24x24 patch grid; the merge map, i.e. the kept "
        "token each pruned patch merged into most strongly; the class attention with the IQR "
        "fence) and OUT_DIR/<name>.tokens.json (counts, kept/outlier/sample patch indices, "
        "per-patch merge target and role). Unreadable images are skipped with a warning.",
    )
    tokens.set_defaults(command_parser=tokens)
    tokens.add_argument("images", nargs="+", help="image files, or folders of images")
    common.add_reduction_arguments(tokens, mode_default="prumerge+")
    tokens.add_argument(
        "--out-dir", default="vis", help="Folder for the PNG and JSON files. Default: vis."
    )

    histogram = commands.add_parser(
        "histogram",
        parents=[shared],
        help="histogram of tokens per image over a folder",
        description="Reduce every image of FOLDER with each mode of --modes and write a "
        "histogram PNG of visual tokens per image (kept + extra token) plus a JSONL with one "
        "line per image: {image, tokens: {mode: count}, error}. Unreadable images get a line "
        "with the error and are left out of the histogram.",
    )
    histogram.set_defaults(command_parser=histogram)
    histogram.add_argument("folder", help="folder of images")
    histogram.add_argument(
        "--modes",
        nargs="+",
        default=["prumerge", "prumerge+"],
        choices=common.MODES,
        help="One histogram series per mode (the tower runs once per batch for all). "
        "Default: prumerge prumerge+.",
    )
    common.add_reduction_arguments(histogram, mode_default=None)
    histogram.add_argument(
        "--out", default="vis/histogram.png", help="PNG to write. Default: vis/histogram.png."
    )
    histogram.add_argument(
        "--counts",
        default=None,
        help="JSONL of per-image counts to write. Default: --out with the suffix .jsonl.",
    )
    return parser


class Tower:
    """The checkpoint's image processor + PruMergeEncoder (tower loaded once)."""

    def __init__(self, model: str, device: str | None, dtype: str) -> None:
        import torch
        from transformers import AutoConfig, AutoProcessor

        from vllm_prumerge.encoder import PruMergeEncoder

        config = AutoConfig.from_pretrained(model)
        self.image_processor = AutoProcessor.from_pretrained(model).image_processor
        self.encoder = PruMergeEncoder(
            model,
            config.vision_config,
            vision_feature_layer=config.vision_feature_layer,
            dtype=getattr(torch, dtype),
            device=device,
        )

    def pixel_values(self, images):
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def reduce(self, pixel_values, configs):
        """One tower forward, then one reduction per config: {mode: ReducedTokens}."""
        from vllm_prumerge.reduction import reduce_tokens
        from vllm_prumerge.vision import clip_prumerge_inputs

        inputs = clip_prumerge_inputs(
            self.encoder.tower, pixel_values, self.encoder.vision_feature_layer
        )
        return {config.mode: reduce_tokens(*inputs, config) for config in configs}


def expand_inputs(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = common.find_images(path)
            if not found:
                common.warn(f"no images in folder {path}")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return files


def load_all(paths: list[Path]) -> tuple[list[tuple[Path, object]], dict[Path, str]]:
    """Decode every image; unreadable ones are reported and returned as errors."""
    images, errors = [], {}
    for path in paths:
        try:
            images.append((path, common.open_image(path)))
        except ValueError as exc:
            common.warn(f"skipping: {exc}")
            errors[path] = str(exc)
    return images, errors


def run_tokens(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        files = expand_inputs(args.images)
        options = common.reduction_options(args, args.mode)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    from vllm_prumerge import PruMergeConfig, vis

    config = PruMergeConfig.from_dict(options)
    images, errors = load_all(files)
    if not images:
        print("error: no readable images", file=sys.stderr)
        return 1
    tower = Tower(common.resolve_model(args), args.device, args.dtype)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = tower.image_processor.image_mean, tower.image_processor.image_std
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        pixel_values = tower.pixel_values([image for _, image in chunk])
        reduced = tower.reduce(pixel_values, [config])[config.mode]
        for b, (path, _) in enumerate(chunk):
            tmap = vis.token_map(reduced, b)
            seen = vis.model_input_image(pixel_values[b], mean, std)
            figure = vis.draw_token_map(seen, tmap, title=f"{path.name} [{config.mode}]")
            png = vis.save_figure(figure, out_dir / f"{path.stem}.tokens.png")
            record = {"image": str(path), "mode": config.mode, "config": config.to_dict()}
            record.update(tmap.to_dict())
            (out_dir / f"{path.stem}.tokens.json").write_text(json.dumps(record) + "\n")
            counts = tmap.counts()
            print(
                f"{path.name}: {counts['tokens']} tokens ({counts['outliers']} outliers + "
                f"{counts['samples']} samples + {counts['extra']} extra) -> {png}"
            )
    print(f"{len(images)} token map(s) in {out_dir}, {len(errors)} image(s) skipped")
    return 0


def run_histogram(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    modes = list(dict.fromkeys(args.modes))
    try:
        files = common.find_images(args.folder)
        options = [common.reduction_options(args, m) for m in modes]
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    from vllm_prumerge import PruMergeConfig, vis

    configs = [PruMergeConfig.from_dict(o) for o in options]
    if not files:
        parser.error(f"no images ({', '.join(common.IMAGE_EXTENSIONS)}) in {args.folder}")
    images, errors = load_all(files)
    counts_path = Path(args.counts) if args.counts else Path(args.out).with_suffix(".jsonl")
    counts_path.parent.mkdir(parents=True, exist_ok=True)
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    started = time.perf_counter()
    with counts_path.open("w") as out:
        for path, error in errors.items():
            out.write(json.dumps({"image": str(path), "tokens": None, "error": error}) + "\n")
        if images:
            tower = Tower(common.resolve_model(args), args.device, args.dtype)
            num_patches = tower.encoder.num_patches
            for start in range(0, len(images), args.batch_size):
                chunk = images[start : start + args.batch_size]
                reduced = tower.reduce(tower.pixel_values([im for _, im in chunk]), configs)
                for b, (path, _) in enumerate(chunk):
                    per_mode = {m: reduced[m].host_lengths[b] for m in modes}
                    for m, n in per_mode.items():
                        tokens[m].append(n)
                    record = {"image": str(path), "tokens": per_mode, "error": None}
                    out.write(json.dumps(record) + "\n")
                print(f"{min(start + len(chunk), len(images))}/{len(images)} images", flush=True)
        else:
            num_patches = None
    figure = vis.draw_count_histogram(
        tokens,
        num_patches=num_patches,
        title=f"{Path(args.folder).name}: visual tokens per image ({len(images)} images"
        + (f"; stock LLaVA: {num_patches})" if num_patches else ")"),
    )
    png = vis.save_figure(figure, args.out)
    for m in modes:
        if tokens[m]:
            print(f"{m}: mean {sum(tokens[m]) / len(tokens[m]):.1f} tokens per image")
    print(
        f"histogram -> {png}, counts -> {counts_path} ({len(images)} images, {len(errors)} "
        f"unreadable, {time.perf_counter() - started:.1f} s)"
    )
    return 0 if images else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = args.command_parser  # errors show the subcommand's usage
    if args.batch_size < 1:
        command_parser.error("--batch-size must be >= 1")
    if args.command == "tokens":
        return run_tokens(args, command_parser)
    return run_histogram(args, command_parser)


if __name__ == "__main__":
    sys.exit(main())
