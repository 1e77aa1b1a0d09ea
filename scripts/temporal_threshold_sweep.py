"""The sweep behind the default `temporal_threshold` of `temporal="adaptive"` (docs/notes/
temporal-threshold.md): the share of patches each threshold retains on generated videos, per
video family's tower, and the share of patches of the cosine to the anchor.

For each video family's generated tiny checkpoint (the towers the tests serve: SigLIP 384/14 with
729 patches, CLIP-L/14-336 with 576, Video-LLaVA's 224 px CLIP with 256) and each video kind:

- static: one scene eight times, through a real MP4 round trip (codec noise, as a server sees it);
- cut: scene A four times then scene B four times, through the MP4 round trip;
- panning: a camera panning 12 px a frame across one scene (8 frames), through the MP4;
- distinct: eight different scenes;

it prints the retained share of frames 2..8 (frame 1 is always whole) and, for the cut, the
retained share of the first frame after the cut (1.0 = that frame whole), at each threshold.

    python scripts/temporal_threshold_sweep.py [--thresholds 0.5,0.8,...]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

FAMILIES = {"onevision": "vision_tower", "next_video": "vision_tower", "video_llava": "video_tower"}
THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)


def videos() -> dict[str, np.ndarray]:
    from vllm_prumerge.testing import make_scenes, make_video
    from vllm_prumerge.testing.media import decode_mp4, encode_mp4

    scenes = make_scenes(10, seed=1)

    def clip(images) -> np.ndarray:
        return np.stack([np.asarray(s.convert("RGB").resize((336, 336))) for s in images])

    a, b = scenes[1], scenes[6]
    return {
        "static": decode_mp4(encode_mp4(clip([a] * 8))),
        "cut": decode_mp4(encode_mp4(clip([a] * 4 + [b] * 4))),
        "panning": decode_mp4(encode_mp4(make_video(seed=3, frames=8, size=(336, 336)))),
        "distinct": clip(scenes[:8]),
    }


def patch_features(checkpoint: Path, tower: str, video: np.ndarray) -> torch.Tensor:
    """`[T, N, C]` the tower's patch features of the video's frames, as the plugin's encoder
    computes them (one forward per frame)."""
    from transformers import AutoConfig, AutoProcessor

    from vllm_prumerge.encoder import PruMergeEncoder
    from vllm_prumerge.vision import tower_scores

    config = AutoConfig.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    pixels = processor.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"][
        0
    ]
    encoder = PruMergeEncoder(
        str(checkpoint),
        config.vision_config,
        device="cpu",
        tower_name=tower,
        vision_feature_layer=config.vision_feature_layer,
    )
    with torch.inference_mode():
        rows = [
            tower_scores(encoder.tower, f[None], config.vision_feature_layer).features
            for f in pixels
        ]
    return torch.cat(rows).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]

    from vllm_prumerge.reduction import adaptive_retention_mask
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if "model name" in line),
        platform.processor(),
    )
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}")
    cache = Path(tempfile.gettempdir()) / "vllm-prumerge-sweep"
    clips = videos()
    print("| tower | video | " + " | ".join(f"{t:g}" for t in thresholds) + " |")
    print("|---|---|" + "---|" * len(thresholds))
    for family, tower in FAMILIES.items():
        checkpoint = cached_tiny_llava(TinyLlavaSpec(family=family), cache_dir=cache)
        for kind, video in clips.items():
            features = patch_features(checkpoint, tower, video)
            cells = []
            for threshold in thresholds:
                retained = adaptive_retention_mask(features, threshold)
                share = retained[1:].float().mean().item()
                cell = f"{share:.2f}"
                if kind == "cut":
                    cell += f" (B: {retained[4].float().mean().item():.2f})"
                cells.append(cell)
            name = f"{family} ({features.shape[1]} patches)"
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
