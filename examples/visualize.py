"""See which patches PruMerge keeps, samples and merges, and how token counts spread over images.

No vLLM needed: the checkpoint's vision tower (CLIP or SigLIP) runs through
`vllm_prumerge.encoder.PruMergeEncoder` and the figures come from `vllm_prumerge.vis`.

    # one PNG (+ JSON with the numbers) per image: the patch grid with kept outliers, PruMerge+
    # spatial samples, and the kept token each pruned patch merged into most strongly
    python examples/visualize.py tokens --tiny --mode prumerge+ --out-dir vis inputs/scene_00.png

    # LLaVA-NeXT: every crop (base view + high-resolution tiles) drawn on the original image
    python examples/visualize.py tokens --tiny --family llava_next --out-dir vis inputs/scene_00.png

    # a video (an MP4 file, or a folder of frames): a filmstrip of its frames, each reduced on
    # its own (LLaVA-OneVision, LLaVA-NeXT-Video)
    python examples/visualize.py tokens --tiny --family next_video --video inputs/video.mp4

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

from vllm_prumerge.testing.engine_args import resolve_model

FAMILIES = ("llava", "llava_next", "siglip", "onevision", "next_video")
VIDEO_FRAMES = 32  # frames taken from a video by default: vLLM's video loader's default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run `visualize.py tokens --help` / `visualize.py histogram --help` for options.",
    )
    shared = argparse.ArgumentParser(add_help=False)
    common.add_model_arguments(shared)
    shared.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="With --tiny: which generated checkpoint. llava: LLaVA-1.5 (CLIP 336/14, one 24x24 "
        "grid per image); llava_next: LLaVA-NeXT anyres (a base view plus 1x2, 2x1 or 2x2 "
        "tiles of 336 px, each reduced on its own); siglip: SigLIP-LLaVA like LLaVA-Interleave "
        "(384/14, 27x27 grid, no CLS: received attention); onevision: LLaVA-OneVision (that "
        "SigLIP tower per anyres crop; images and videos); next_video: LLaVA-NeXT-Video (CLIP "
        "336/14 per frame; videos only). With --model the checkpoint's own config decides. "
        "Default: llava.",
    )
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
        "outliers and spatial samples on the patch grid; the merge map, i.e. the kept "
        "token each pruned patch merged into most strongly; the importance (class attention, "
        "or received attention on SigLIP) with the IQR fence) and OUT_DIR/<name>.tokens.json "
        "(counts, kept/outlier/sample patch indices, per-patch merge target and role). "
        "LLaVA-NeXT: two rows of panels on the original image, the base view and the tiles "
        "mapped back onto the region each covers; the JSON holds the image's totals and one "
        "entry per crop. Unreadable images are skipped with a warning. With --video, each "
        "input is one video and the PNG is a filmstrip: one column per frame, kept patches "
        "above, the merge map below; the JSON holds the video's totals, its stock count and one "
        "entry per frame.",
    )
    tokens.set_defaults(command_parser=tokens)
    tokens.add_argument(
        "images",
        nargs="+",
        help="image files, or folders of images; with --video: video files (MP4, ...), or "
        "folders whose images are one video's frames in name order",
    )
    tokens.add_argument(
        "--video",
        action="store_true",
        help="Each input is a video (a checkpoint that takes videos: LLaVA-OneVision, "
        "LLaVA-NeXT-Video): its frames go through the family's video processor and each frame "
        "is reduced on its own, as the plugin serves videos (sum over frames of kept + 1); with "
        "--option temporal=evs|adaptive, after the temporal stage, the patches it dropped as "
        "unchanged drawn orange.",
    )
    tokens.add_argument(
        "--frames",
        type=int,
        default=VIDEO_FRAMES,
        metavar="N",
        help="With --video: take N frames spread evenly over each video (first and last "
        "included), or all of a shorter one. Default: %(default)s, as vLLM's video loader.",
    )
    common.add_reduction_arguments(tokens, mode_default="prumerge+")
    tokens.add_argument(
        "--out-dir", default="vis", help="Folder for the PNG and JSON files. Default: vis."
    )

    histogram = commands.add_parser(
        "histogram",
        parents=[shared],
        help="histogram of tokens per image over a folder",
        description="Reduce every image of FOLDER with each mode of --modes and write a "
        "histogram PNG of visual tokens per image (kept + extra token; LLaVA-NeXT: summed over "
        "the image's crops; mode off: the stock count) plus a JSONL with one line per image: "
        "{image, tokens: {mode: count}, error}. Unreadable images get a line with the error "
        "and are left out of the histogram.",
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


def checkpoint_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """`--model` as given, or the generated checkpoint of `--family` for `--tiny`."""
    if not args.tiny:
        if args.family is not None:
            parser.error("--family applies to --tiny; with --model the checkpoint decides")
        return args.model
    from vllm_prumerge.testing import TinyLlavaSpec

    return resolve_model(None, TinyLlavaSpec(family=args.family or "llava"))


class Tower:
    """The checkpoint's processor + PruMergeEncoder (tower loaded once), for every family."""

    def __init__(self, model: str, device: str | None, dtype: str) -> None:
        import torch
        from transformers import AutoConfig, AutoProcessor

        from vllm_prumerge.encoder import PruMergeEncoder

        self.config = AutoConfig.from_pretrained(model)
        self.processor = AutoProcessor.from_pretrained(model)
        self.image_processor = self.processor.image_processor
        # LLaVA-NeXT (anyres): every image is a base view plus a grid of tiles.
        self.pinpoints = getattr(self.config, "image_grid_pinpoints", None)
        self.encoder = PruMergeEncoder(
            model,
            self.config.vision_config,
            vision_feature_layer=self.config.vision_feature_layer,
            dtype=getattr(torch, dtype),
            device=device,
        )

    @property
    def patch_size(self) -> int:
        return self.config.vision_config.patch_size

    @property
    def crop_size(self) -> int:
        return self.config.vision_config.image_size

    def crops(self, images) -> tuple[object, list[int]]:
        """The tower inputs `[K, 3, S, S]` of the images (their crops, in the processor's
        order: base view, then tiles row-major) and how many rows each image has."""
        import torch
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        processed = self.image_processor(images, return_tensors="pt")
        pixel_values = processed["pixel_values"]
        if self.pinpoints is None:
            return pixel_values, [1] * len(images)
        counts = []
        for height, width in processed["image_sizes"].tolist():
            rows, cols = get_anyres_image_grid_shape(
                (height, width), self.pinpoints, self.crop_size
            )
            counts.append(1 + rows * cols)
        # [B, max_crops, 3, S, S], zero-padded to the batch's largest image: keep real crops.
        rows = torch.cat([pixel_values[b, :n] for b, n in enumerate(counts)])
        return rows, counts

    def importance(self, config) -> str:
        """The importance `config` uses on this tower: "cls" or "received"."""
        from vllm_prumerge.vision import resolve_importance

        return resolve_importance(config.importance, self.encoder.has_cls)

    def reduce(self, pixel_values, configs, video: bool = False):
        """One tower forward per importance kind, then one reduction per config:
        {mode: ReducedTokens}, one row per crop (or per frame of a `video`: after the temporal
        stage of `config.temporal`, as the plugin's encoder reduces video frames)."""
        from vllm_prumerge.reduction import reduce_by_importance, reduce_frames
        from vllm_prumerge.vision import tower_scores

        scores, reduced = {}, {}
        for config in configs:
            kind = self.importance(config)
            if kind not in scores:
                scores[kind] = tower_scores(
                    self.encoder.tower, pixel_values, self.encoder.vision_feature_layer, kind
                )
            reduce = reduce_frames if video else reduce_by_importance
            reduced[config.mode] = reduce(*scores[kind], config)
        return reduced

    def video_crops(self, video) -> object:
        """The tower inputs `[T, 3, S, S]` of a video's frames (uint8 `[T, H, W, 3]`), by the
        family's own video processor."""
        processed = self.processor.video_processor(videos=[video], return_tensors="pt")
        return processed["pixel_values_videos"][0]

    def stock_video_tokens(self, video) -> int:
        """Visual tokens of the stock model for this video: the processor's own expansion of
        the video token (the family's pooling per frame, and any newline)."""
        token = self.processor.video_token
        ids = self.processor(text=token, videos=[video], return_tensors="pt")["input_ids"][0]
        return int((ids == self.config.video_token_index).sum())

    def stock_tokens(self, image) -> int:
        """Visual tokens of the stock model for this image: the processor's own expansion of
        the image token (LLaVA-NeXT: base view + unpadded tiles + one newline per row)."""
        if self.pinpoints is None:
            return self.encoder.num_patches
        sizes = [(image.height, image.width)]
        return int(
            self.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"][0]
        )

    def image_tokens(self, reduced, start: int, count: int, image, config) -> int:
        """What the LLM receives for one image whose crops are rows `start..start+count-1`:
        each crop's kept tokens + its extra token, or the stock count in mode off."""
        if not config.enabled:
            return self.stock_tokens(image)
        return sum(reduced.host_lengths[start : start + count])


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


def load_video(path: Path, frames: int):
    """uint8 `[T, H, W, 3]`: `frames` frames spread over a video file, or a folder's images
    (name order; every image resized to the first one's size)."""
    import numpy as np

    from vllm_prumerge.testing.media import read_video

    if not path.is_dir():
        return read_video(path, frames)
    pictures = [common.open_image(p) for p in common.find_images(path)]
    if not pictures:
        raise ValueError(f"no frames (images) in folder {path}")
    if frames < len(pictures):
        picks = np.linspace(0, len(pictures) - 1, frames, dtype=int)
        pictures = [pictures[i] for i in picks]
    return np.stack([np.asarray(p.resize(pictures[0].size)) for p in pictures])


def run_video_tokens(args, parser, tower, config, importance_name: str) -> int:
    """`tokens --video`: one filmstrip PNG + JSON per video."""
    from vllm_prumerge import vis

    if getattr(tower.config, "video_token_index", None) is None:
        parser.error(f"{type(tower.config).__name__} takes no videos: drop --video")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = (
        tower.processor.video_processor.image_mean,
        tower.processor.video_processor.image_std,
    )
    done = 0
    for path in map(Path, args.images):
        try:
            video = load_video(path, args.frames)
        except (ValueError, OSError) as exc:
            common.warn(f"skipping: {exc}")
            continue
        pixel_values = tower.video_crops(video)
        reduced = tower.reduce(pixel_values, [config], video=True)[config.mode]
        tmaps = [
            vis.token_map(reduced, t, importance_name=importance_name)
            for t in range(len(pixel_values))
        ]
        frames = [vis.model_input_image(row, mean, std) for row in pixel_values]
        stock = tower.stock_video_tokens(video)
        across = config.enabled and config.temporal != "off"
        title = f"{path.name} [{config.mode}{f', temporal {config.temporal}' if across else ''}]"
        figure = vis.draw_filmstrip(
            frames, tmaps, title=title, stock_tokens=stock, patch_size=tower.patch_size
        )
        counts = vis.total_counts(tmaps)
        counts["tokens"] = sum(reduced.host_lengths) if config.enabled else stock
        record = {"video": str(path), "mode": config.mode, "config": config.to_dict()}
        record.update(counts)
        record.update(frames=len(tmaps), stock_tokens=stock)
        record["frame_maps"] = [tmap.to_dict() for tmap in tmaps]
        png = vis.save_figure(figure, out_dir / f"{path.stem}.tokens.png")
        (out_dir / f"{path.stem}.tokens.json").write_text(json.dumps(record) + "\n")
        print(
            f"{path.name}: {counts['tokens']} tokens over {len(tmaps)} frames (stock {stock}; "
            f"{counts['outliers']} outliers + {counts['samples']} samples + {counts['extra']} "
            f"extra; {counts['unchanged']} patches unchanged across time) -> {png}"
        )
        done += 1
    print(f"{done} filmstrip(s) in {out_dir}, {len(args.images) - done} video(s) skipped")
    return 0 if done else 1


def run_tokens(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    try:
        files = [] if args.video else expand_inputs(args.images)
        options = common.reduction_options(args, args.mode)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.video:
        missing = [p for p in args.images if not Path(p).exists()]
        if missing:
            parser.error(f"no such video or folder: {missing[0]}")
    from vllm_prumerge import PruMergeConfig, vis

    config = PruMergeConfig.from_dict(options)
    model = checkpoint_of(args, parser)
    images, errors = load_all(files)
    if not images and not args.video:
        print("error: no readable images", file=sys.stderr)
        return 1
    tower = Tower(model, args.device, args.dtype)
    try:
        importance = tower.importance(config)
    except ValueError as exc:
        parser.error(str(exc))
    importance_name = f"{'class' if importance == 'cls' else 'received'} attention"
    if args.video:
        return run_video_tokens(args, parser, tower, config, importance_name)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = tower.image_processor.image_mean, tower.image_processor.image_std
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        pixel_values, crops = tower.crops([image for _, image in chunk])
        reduced = tower.reduce(pixel_values, [config])[config.mode]
        row = 0
        for (path, image), count in zip(chunk, crops, strict=True):
            tmaps = [
                vis.token_map(reduced, k, importance_name=importance_name)
                for k in range(row, row + count)
            ]
            title = f"{path.name} [{config.mode}]"
            record = {"image": str(path), "mode": config.mode, "config": config.to_dict()}
            if tower.pinpoints is None:
                seen = vis.model_input_image(pixel_values[row], mean, std)
                figure = vis.draw_token_map(
                    seen, tmaps[0], title=title, patch_size=tower.patch_size
                )
                record.update(tmaps[0].to_dict())
                counts = tmaps[0].counts()
                crops_note = ""
            else:
                stock = tower.stock_tokens(image)
                places = vis.anyres_placements(
                    image.size,
                    tower.pinpoints,
                    crop_size=tower.crop_size,
                    patch_size=tower.patch_size,
                )
                figure = vis.draw_anyres_token_maps(
                    image, places, tmaps, title=title, stock_tokens=stock
                )
                counts = vis.total_counts(tmaps)
                counts["tokens"] = tower.image_tokens(reduced, row, count, image, config)
                record.update(counts)
                record["stock_tokens"] = stock
                record["crop_maps"] = [
                    {"placement": place.to_dict(), **tmap.to_dict()}
                    for place, tmap in zip(places, tmaps, strict=True)
                ]
                crops_note = f" over {count} crops"
            png = vis.save_figure(figure, out_dir / f"{path.stem}.tokens.png")
            (out_dir / f"{path.stem}.tokens.json").write_text(json.dumps(record) + "\n")
            print(
                f"{path.name}: {counts['tokens']} tokens{crops_note} ({counts['outliers']} "
                f"outliers + {counts['samples']} samples + {counts['extra']} extra) -> {png}"
            )
            row += count
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
        parser.error(f"no images ({', '.join(common.IMAGE_SUFFIXES)}) in {args.folder}")
    model = checkpoint_of(args, parser)
    images, errors = load_all(files)
    counts_path = Path(args.counts) if args.counts else Path(args.out).with_suffix(".jsonl")
    counts_path.parent.mkdir(parents=True, exist_ok=True)
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    started = time.perf_counter()
    stock = None
    with counts_path.open("w") as out:
        for path, error in errors.items():
            out.write(json.dumps({"image": str(path), "tokens": None, "error": error}) + "\n")
        if images:
            tower = Tower(model, args.device, args.dtype)
            for config in configs:
                try:
                    tower.importance(config)
                except ValueError as exc:
                    parser.error(str(exc))
            # LLaVA-NeXT's stock count depends on the image size: no single figure to quote.
            stock = None if tower.pinpoints else tower.encoder.num_patches
            for start in range(0, len(images), args.batch_size):
                chunk = images[start : start + args.batch_size]
                pixel_values, crops = tower.crops([im for _, im in chunk])
                reduced = tower.reduce(pixel_values, configs)
                row = 0
                for (path, image), count in zip(chunk, crops, strict=True):
                    per_mode = {
                        c.mode: tower.image_tokens(reduced[c.mode], row, count, image, c)
                        for c in configs
                    }
                    for m, n in per_mode.items():
                        tokens[m].append(n)
                    record = {"image": str(path), "tokens": per_mode, "error": None}
                    if tower.pinpoints is not None:
                        record["crops"] = count
                    out.write(json.dumps(record) + "\n")
                    row += count
                print(f"{min(start + len(chunk), len(images))}/{len(images)} images", flush=True)
    figure = vis.draw_count_histogram(
        tokens,
        num_patches=stock,
        title=f"{Path(args.folder).name}: visual tokens per image ({len(images)} images"
        + (f"; stock LLaVA: {stock})" if stock else ")"),
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
