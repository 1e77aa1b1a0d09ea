"""What every PruMerge video family shares: per-frame reduction, its counts and its bounds.

Semantics (per video): each frame is reduced exactly as a LLaVA-1.5 image on the tower's full
patch grid (its own importance, IQR fence, PruMerge+ samples, merge within the frame, then its
own extra token); frames are concatenated in time order with no spatial pooling and no newline,
so a video costs ``sum over frames (kept_f + 1)`` tokens (``fixed``: ``frames * (budget + 1)``).
With ``temporal`` (``evs`` / ``adaptive``) the encoder first drops the patches that did not
change across time (:mod:`vllm_prumerge.reduction.temporal`) and each frame is reduced on the
patches it retained: ``sum over frames with any retained patch (kept_f + 1)``. Either way the
count is the rows of the features the encoder hands over, which is what the placeholders,
the scheduler and the metrics see.
``off`` is the family's stock vLLM video path token for token: the full frame features go to the
engine, which packs them the stock way (:meth:`PruMergeVideoModelMixin._pack_stock_video`).

Each mixin goes in front of the family's image mixin (or the base one) and vLLM's class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.multimodal.parse import MultiModalDataItems

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.serving import metrics
from vllm_prumerge.serving.base import (
    STOCK_KEYS,
    VIDEO_FEATURES_KEY,
    PruMergeModelMixin,
    PruMergeProcessingInfoMixin,
    PruMergeProcessorMixin,
    stock_field,
)
from vllm_prumerge.serving.options import CONFIG_KEY, PROFILE_KEY, request_config

STOCK_FRAMES_KEY = STOCK_KEYS["video"]


class PruMergeVideoProcessingInfoMixin(PruMergeProcessingInfoMixin):
    """Video bounds (before a family's image mixin, if any, and vLLM's ProcessingInfo)."""

    def get_num_stock_video_tokens(self, frames: int) -> int:
        """The family's stock visual tokens for a video of `frames` frames (each processed to
        the tower's input size)."""
        size = self.get_hf_config().vision_config.image_size
        return self.get_num_video_tokens(image_width=size, image_height=size, num_frames=frames)

    def get_max_frame_tokens(self) -> int:
        """A reduced frame's worst case: every patch kept (at most the engine's ``max_tokens``)
        plus its extra token (577 for CLIP-L/14-336, 730 for SigLIP 384/14 without a ceiling:
        more than a stock frame after pooling). The temporal stage only lowers it."""
        return self.get_max_crop_tokens()

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        # Enough frames that a video keeping every patch fills the whole sequence: any video
        # that fits a prompt is within the bound, whatever its frame count.
        return max(1, math.ceil(seq_len / self.get_max_frame_tokens()))

    def get_max_video_tokens(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        reduced = frames * self.get_max_frame_tokens()
        if not self.stock_reachable:  # an engine `max_tokens` ceiling rules `off` out
            return reduced
        return max(reduced, self.get_num_stock_video_tokens(frames))

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        bounds = {"video": self.get_max_video_tokens(seq_len, mm_counts)}
        if "image" in self.get_supported_mm_limits():
            bounds["image"] = self.get_max_image_tokens()
        return bounds


class PruMergeVideoProcessorMixin(PruMergeProcessorMixin):
    """Runs each video's frames through the tower + reduction (before a family's image mixin,
    if any, and vLLM's processor)."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        hf_data = dict(hf_data)
        videos = hf_data.pop("videos", None) or []
        if not videos:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        images = hf_data.get("images") or []
        if images:  # the HF processor wants one placeholder per image and no video token
            image_token = self.info.get_hf_processor().image_token
            image_data = {"text": image_token * len(images), "images": images}
            processed = super()._call_hf_processor(image_data, hf_kwargs)
        else:
            processed = BatchFeature()
        processed.update(self._reduce_videos(videos, hf_kwargs))
        return processed

    def _reduce_videos(
        self, videos: Sequence[object], hf_kwargs: Mapping[str, object]
    ) -> dict[str, object]:
        """Each video through the HF video processor alone (frame counts differ), then every
        frame through the tower and the reduction alone."""
        hf_kwargs = dict(hf_kwargs)
        config = request_config(self.info.engine_config, hf_kwargs.pop(CONFIG_KEY, None))
        dtype = self.info.ctx.model_config.dtype
        if hf_kwargs.pop(PROFILE_KEY, False):
            # Start-up profiling: every frame at its worst-case length, no tower.
            width = self.info.get_hf_config().vision_config.hidden_size
            rows = self.info.get_max_frame_tokens()
            return {
                VIDEO_FEATURES_KEY: [
                    torch.zeros((len(v) * rows, width), dtype=dtype) for v in videos
                ],
                STOCK_FRAMES_KEY: stock_field([0] * len(videos)),
            }
        processor = self.info.get_hf_processor(**hf_kwargs)
        features, stock_frames, counts, seconds = [], [], [], 0.0
        for video in videos:
            source = video[0] if isinstance(video, tuple) else video  # (frames, metadata)
            if len(source) == 0:  # before the HF processor, which fails obscurely on none
                raise ValueError("vllm-prumerge: a video needs at least one frame")
            pixel_values = self.info.ctx.call_hf_processor(
                processor, {"text": processor.video_token, "videos": video}, hf_kwargs
            )["pixel_values_videos"][0]  # [T, 3, H, W]
            frames = len(pixel_values)
            per_frame, frame_seconds = self._encode_frames(pixel_values, config)
            seconds += frame_seconds
            features.append(torch.cat(per_frame).to(dtype))
            stock_frames.append(0 if config.enabled else frames)
            if config.enabled:
                counts.append(len(features[-1]))
            else:
                counts.append(self.info.get_num_stock_video_tokens(frames))
        metrics.record(
            config.mode, counts, seconds, largest=self.info.largest_item_tokens, modality="video"
        )
        return {
            VIDEO_FEATURES_KEY: features,
            STOCK_FRAMES_KEY: stock_field(stock_frames),
        }

    def _encode_frames(
        self, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[torch.Tensor], float]:
        """`[T, 3, H, W]` frames -> one `[L_t, C]` tower-space tensor per frame (reduced, or in
        ``off`` the features the engine packs the stock way), and the seconds taken."""
        # One row per frame; with `config.temporal`, frames reduced on their retained patches.
        encoded = self.info.encoders["video"].encode_frames(pixel_values, config)
        return encoded.features, encoded.seconds

    def _stock_tokens(
        self, modality: str, units: int, mm_items: MultiModalDataItems, item_idx: int
    ) -> int:
        if modality == "video":
            return self.info.get_num_stock_video_tokens(units)
        return super()._stock_tokens(modality, units, mm_items, item_idx)


class PruMergeVideoModelMixin(PruMergeModelMixin):
    """Reduced frames pass through the projector; ``off`` frames are packed the stock way."""

    modalities = frozenset({"image", "video"})

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``[T, N, C]`` full tower features of a video's frames -> the family's stock
        ``[L, H]`` (projector, pooling, newline, in the family's order)."""
        raise NotImplementedError

    def _embed_videos(
        self, per_video: list[torch.Tensor], stock: list[int], kwargs: dict[str, object]
    ) -> list[torch.Tensor]:
        """Per-video ``[L_v, H]`` LLM embeddings: reduced videos in one projector call, ``off``
        videos (`stock` frames each, ``[T * N, C]``) packed the family's stock way."""
        reduced = [f for f, n in zip(per_video, stock, strict=True) if n == 0]
        projected = iter(self._project(reduced) if reduced else ())
        return [
            next(projected) if n == 0 else self._pack_stock_video(f.view(n, -1, f.shape[-1]))
            for f, n in zip(per_video, stock, strict=True)
        ]
