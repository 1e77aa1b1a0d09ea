"""What every PruMerge video family shares: per-frame reduction, its counts and its bounds.

Semantics (per video): each frame is reduced exactly as a LLaVA-1.5 image on the tower's full
patch grid (its own importance, IQR fence, PruMerge+ samples, merge within the frame, then its
own extra token); frames are concatenated in time order with no spatial pooling and no newline,
so a video costs ``sum over frames (kept_f + 1)`` tokens (``fixed``: ``frames * (budget + 1)``).
``off`` is the family's stock vLLM video path token for token: the full frame features go to the
engine, which packs them the stock way (:meth:`PruMergeVideoModelMixin._pack_stock_video`).

Each mixin goes in front of the family's image mixin (or the base one) and vLLM's class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.encoder import PruMergeEncoder
from vllm_prumerge.serving import metrics
from vllm_prumerge.serving.base import (
    FEATURES_KEY,
    PruMergeImageFeatureInputs,
    PruMergeModelMixin,
    PruMergeProcessingInfoMixin,
    PruMergeProcessorMixin,
)
from vllm_prumerge.serving.options import CONFIG_KEY, PROFILE_KEY, request_config

# Per video: `[L_v, C]` tower-space features (reduced frames concatenated, or `off`: every
# frame's full patch grid).
VIDEO_FEATURES_KEY = "prumerge_video_features"
# Per video: the frames the engine packs the stock way (`off`), or 0 when the features are
# already the reduced tokens.
STOCK_FRAMES_KEY = "prumerge_stock_frames"


def _stock_tokens(info, frames: int) -> int:
    """The family's stock visual tokens for a video of `frames` frames (frame size unused)."""
    return info.get_num_video_tokens(image_width=0, image_height=0, num_frames=frames)


class PruMergeVideoProcessingInfoMixin(PruMergeProcessingInfoMixin):
    """Video bounds (before a family's image mixin, if any, and vLLM's ProcessingInfo)."""

    @cached_property
    def video_encoder(self) -> PruMergeEncoder:
        """The tower + reduction of video frames: the image tower's (Video-LLaVA: its own)."""
        return self.encoder

    def get_max_frame_tokens(self) -> int:
        """A reduced frame's worst case: every patch kept plus its extra token (577 for
        CLIP-L/14-336, 730 for SigLIP 384/14: more than a stock frame after pooling)."""
        return self.get_patches_per_crop() + 1

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        # Enough frames that a video keeping every patch fills the whole sequence: any video
        # that fits a prompt is within the bound, whatever its frame count.
        return max(1, math.ceil(seq_len / self.get_max_frame_tokens()))

    def get_max_video_tokens(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        return max(frames * self.get_max_frame_tokens(), _stock_tokens(self, frames))

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
                STOCK_FRAMES_KEY: torch.zeros(len(videos), dtype=torch.int64),
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
            counts.append(len(features[-1]) if config.enabled else _stock_tokens(self.info, frames))
        metrics.record(
            config.mode, counts, seconds, largest=self.info.largest_item_tokens, modality="video"
        )
        return {
            VIDEO_FEATURES_KEY: features,
            STOCK_FRAMES_KEY: torch.tensor(stock_frames, dtype=torch.int64),
        }

    def _encode_frames(
        self, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[torch.Tensor], float]:
        """`[T, 3, H, W]` frames -> one `[L_t, C]` tower-space tensor per frame (reduced, or in
        ``off`` the features the engine packs the stock way), and the seconds taken."""
        encoded = self.info.video_encoder.encode(pixel_values, config)  # one row per frame
        return encoded.features, encoded.seconds

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            VIDEO_FEATURES_KEY: MultiModalFieldConfig.batched("video"),
            STOCK_FRAMES_KEY: MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_updates = (
            super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
            if "image" in self.info.get_supported_mm_limits()
            else []
        )
        video_token_id = self.info.get_hf_config().video_token_index

        def get_replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["video"][item_idx]
            frames = int(item[STOCK_FRAMES_KEY].data)
            if frames > 0:  # the family's stock count
                count = _stock_tokens(self.info, frames)
            else:  # the exact reduced count of this video
                count = item[VIDEO_FEATURES_KEY].data.shape[0]
            return [video_token_id] * count

        return [
            *image_updates,
            PromptReplacement(
                modality="video", target=[video_token_id], replacement=get_replacement
            ),
        ]


class PruMergeVideoModelMixin(PruMergeModelMixin):
    """Reduced frames pass through the projector; ``off`` frames are packed the stock way."""

    modalities = frozenset({"image", "video"})

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``[T, N, C]`` full tower features of a video's frames -> the family's stock
        ``[L, H]`` (projector, pooling, newline, in the family's order)."""
        raise NotImplementedError

    def get_patches_per_frame(self) -> int:
        """Rows per frame of an ``off`` video's features (the tower's patch grid)."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def _embed_videos(self, features: object, stock_frames: object) -> list[torch.Tensor]:
        """Per-video ``[L_v, H]`` LLM embeddings."""
        inputs = PruMergeImageFeatureInputs(
            data=features, resolve_bindings={"c": self.config.vision_config.hidden_size}
        )
        per_video = list(inputs["data"])
        # Start-up profiling carries no stock frames: the reduced layout.
        frames = [0] * len(per_video) if stock_frames is None else [int(n) for n in stock_frames]
        reduced = [f for f, n in zip(per_video, frames, strict=True) if n == 0]
        projected = iter(self._project(reduced) if reduced else ())
        patches = self.get_patches_per_frame()
        return [
            next(projected) if n == 0 else self._pack_stock_video(f.view(n, patches, -1))
            for f, n in zip(per_video, frames, strict=True)
        ]

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor] | torch.Tensor:
        order = list(kwargs)
        video_features = kwargs.pop(VIDEO_FEATURES_KEY, None)
        stock_frames = kwargs.pop(STOCK_FRAMES_KEY, None)
        if video_features is None:
            return super().embed_multimodal(**kwargs)
        videos = self._embed_videos(video_features, stock_frames)
        image_keys = [k for k in (FEATURES_KEY, "image_embeds") if k in kwargs]
        if not image_keys:
            return videos
        images = list(super().embed_multimodal(**kwargs))
        # vLLM's order of modalities: the order of their keys (as its own OneVision model).
        if min(order.index(k) for k in image_keys) < order.index(VIDEO_FEATURES_KEY):
            return [*images, *videos]
        return [*videos, *images]
