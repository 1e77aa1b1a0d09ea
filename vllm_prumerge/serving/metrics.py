"""Prometheus metrics of the plugin, served on vLLM's own `/metrics` endpoint.

The processor runs in the API-server process, whose default Prometheus registry vLLM exposes;
the metrics are created on first use in a process (creating them twice would be an error).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

# Bucket edges cover PruMerge (~32), PruMerge+ (~144) and stock (576) on a 24x24 grid, and the
# 2304 patches of a 48x48 grid.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 192, 256, 384, 577, 1024, 2305)
# Per video: a few frames to tens of frames, reduced (~30 each) or stock (144-730 each).
VIDEO_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PruMergeMetrics(NamedTuple):
    visual_tokens: object  # Histogram, label: mode
    video_tokens: object  # Histogram, label: mode
    reduction_seconds: object  # Histogram, label: mode


@functools.cache
def metrics() -> PruMergeMetrics:
    from prometheus_client import Histogram

    return PruMergeMetrics(
        visual_tokens=Histogram(
            "vllm_prumerge:visual_tokens_per_image",
            "Visual tokens given to the LLM per image after PruMerge (incl. the extra token).",
            labelnames=["mode"],
            buckets=TOKEN_BUCKETS,
        ),
        video_tokens=Histogram(
            "vllm_prumerge:visual_tokens_per_video",
            "Visual tokens given to the LLM per video (all its frames) after PruMerge (incl. "
            "each frame's extra token).",
            labelnames=["mode"],
            buckets=VIDEO_TOKEN_BUCKETS,
        ),
        reduction_seconds=Histogram(
            "vllm_prumerge:reduction_seconds",
            "Wall time of the vision tower + PruMerge reduction per processed batch of images, "
            "or of videos.",
            labelnames=["mode"],
            buckets=SECONDS_BUCKETS,
        ),
    )


def record(mode: str, tokens_per_item: list[int], seconds: float, modality: str = "image") -> None:
    """Observe each item's visual tokens (an image, or a whole video) and the batch's seconds."""
    m = metrics()
    histogram = m.video_tokens if modality == "video" else m.visual_tokens
    for count in tokens_per_item:
        histogram.labels(mode=mode).observe(count)
    m.reduction_seconds.labels(mode=mode).observe(seconds)
