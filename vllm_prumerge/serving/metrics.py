"""Prometheus metrics of the plugin, served on vLLM's own `/metrics` endpoint.

The processor runs in the API-server process, whose default Prometheus registry vLLM exposes;
the metrics are created on first use in a process (creating them twice would be an error). The
visual-token buckets are derived then from the served family's worst case (:func:`token_buckets`
of the processing info's largest item), so every count the model can produce lands in a finite
bucket, `off` included (e.g. 2,928 for a 672x672 image on llava-hf LLaVA-NeXT, 7,371 for a
2304x2304 one on LLaVA-OneVision).
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

TOKENS_METRIC = "vllm_prumerge:visual_tokens_per_image"
VIDEO_TOKENS_METRIC = "vllm_prumerge:visual_tokens_per_video"
SECONDS_METRIC = "vllm_prumerge:reduction_seconds"
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def token_buckets(largest: int) -> tuple[int, ...]:
    """Bucket edges for visual-token counts up to `largest`: every power of two and 1.5 times
    it (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...), so the reduced counts (tens to a few
    hundred) are resolved within 50 %, ending at the first edge >= `largest`."""
    if largest < 1:
        raise ValueError(f"largest must be a positive token count, got {largest}")
    edges = [1]
    while edges[-1] < largest:
        power = 1 << (edges[-1].bit_length() - 1)
        edges.append(power * 3 // 2 if edges[-1] == power and power > 1 else 2 * power)
    return tuple(edges)


class Histograms(NamedTuple):
    visual_tokens: object  # Histogram, label: mode
    video_tokens: object  # Histogram, label: mode
    reduction_seconds: object  # Histogram, label: mode


class PruMergeMetrics:
    """The plugin's histograms in one Prometheus registry, created on the first :meth:`record`
    (thread-safe): the token buckets are fixed then, by the first model that records (a vLLM
    server serves one model)."""

    def __init__(self, registry=None) -> None:
        self._registry = registry  # None: prometheus_client's default, which vLLM serves
        self._histograms: Histograms | None = None
        self._lock = threading.Lock()

    def histograms(self, largest: int) -> Histograms:
        """The histograms, created with :func:`token_buckets` of `largest` if they do not exist."""
        with self._lock:
            if self._histograms is None:
                from prometheus_client import REGISTRY, Histogram

                registry = REGISTRY if self._registry is None else self._registry
                self._histograms = Histograms(
                    visual_tokens=Histogram(
                        TOKENS_METRIC,
                        "Visual tokens given to the LLM per image after PruMerge (incl. the "
                        "extra token of every crop; off: the family's stock count).",
                        labelnames=["mode"],
                        buckets=token_buckets(largest),
                        registry=registry,
                    ),
                    video_tokens=Histogram(
                        VIDEO_TOKENS_METRIC,
                        "Visual tokens given to the LLM per video after PruMerge (all its frames, "
                        "incl. each frame's extra token; off: the family's stock count).",
                        labelnames=["mode"],
                        buckets=token_buckets(largest),
                        registry=registry,
                    ),
                    reduction_seconds=Histogram(
                        SECONDS_METRIC,
                        "Wall time of the vision tower + PruMerge reduction per processed batch "
                        "of images, or of videos.",
                        labelnames=["mode"],
                        buckets=SECONDS_BUCKETS,
                        registry=registry,
                    ),
                )
            return self._histograms

    def record(
        self,
        mode: str,
        tokens_per_item: list[int],
        seconds: float,
        *,
        largest: int,
        modality: str = "image",
    ) -> None:
        """Observe one processed batch of images or videos (one count per image, or per whole
        video); `largest` is the model's worst-case tokens per item over every modality."""
        histograms = self.histograms(largest)
        tokens = histograms.video_tokens if modality == "video" else histograms.visual_tokens
        for count in tokens_per_item:
            tokens.labels(mode=mode).observe(count)
        histograms.reduction_seconds.labels(mode=mode).observe(seconds)


@functools.cache
def metrics() -> PruMergeMetrics:
    """This process's metrics, in the default registry that vLLM's `/metrics` serves."""
    return PruMergeMetrics()


def record(
    mode: str, tokens_per_item: list[int], seconds: float, *, largest: int, modality: str = "image"
) -> None:
    metrics().record(mode, tokens_per_item, seconds, largest=largest, modality=modality)
