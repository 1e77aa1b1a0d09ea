"""Video-LLaVA (``LanguageBind/Video-LLaVA-7B-hf``) images and videos with PruMerge.

vLLM 0.32 has no Video-LLaVA model (only transformers has ``VideoLlavaForConditionalGeneration``),
so this file is the whole vLLM side of the family: processing info, dummy inputs, processor and
model (projector + LLM). Its two CLIP-L/14 towers at 224 px (16x16 = 256 patches + CLS) run in the
pre-processor (:mod:`vllm_prumerge.serving.base`): ``image_tower`` for images, ``video_tower`` for
video frames, one ``multi_modal_projector`` for both.

Images: reduced as LLaVA-1.5 images (kept tokens + the extra token); ``off``: the 256 patch
features (strategy ``default``, CLS dropped), as transformers.

Videos (see :mod:`vllm_prumerge.serving.video`): each frame reduced as a LLaVA-1.5 image, frames in
time order: ``sum over frames (kept_f + 1)`` tokens. ``off`` is transformers token for token: every
frame's ``hidden_states[vision_feature_layer]`` with its CLS row (transformers applies no select
strategy to videos), projected: ``frames * 257`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature, VideoLlavaConfig, VideoLlavaProcessor
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    BaseLlavaProcessingInfo,
    LlavaForConditionalGeneration,
)
from vllm.model_executor.models.llava_onevision import LlavaOnevisionDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import BaseMultiModalProcessor

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.encoder import PruMergeEncoder
from vllm_prumerge.hub_layout import tower_prefixes
from vllm_prumerge.serving.llava import PruMergeLlavaMultiModalProcessor
from vllm_prumerge.serving.video import (
    PruMergeVideoModelMixin,
    PruMergeVideoProcessingInfoMixin,
    PruMergeVideoProcessorMixin,
)

IMAGE_TOWER = "image_tower"
VIDEO_TOWER = "video_tower"


class VideoLlavaProcessingInfo(BaseLlavaProcessingInfo):
    """The Video-LLaVA processing info vLLM lacks: config, HF processor, stock token counts."""

    def get_hf_config(self) -> VideoLlavaConfig:
        return self.ctx.get_hf_config(VideoLlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> VideoLlavaProcessor:
        return self.ctx.get_hf_processor(VideoLlavaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        """transformers' stock count: every frame's patches plus its CLS row."""
        vision = self.get_hf_config().vision_config
        return num_frames * ((vision.image_size // vision.patch_size) ** 2 + 1)


class PruMergeVideoLlavaProcessingInfo(PruMergeVideoProcessingInfoMixin, VideoLlavaProcessingInfo):
    image_tower = IMAGE_TOWER

    @cached_property
    def video_encoder(self) -> PruMergeEncoder:
        return self.make_encoder(VIDEO_TOWER)

    def get_max_image_tokens(self) -> int:
        # An image is reduced as one frame: every patch kept plus the extra token.
        return self.get_max_frame_tokens()


class PruMergeVideoLlavaDummyInputsBuilder(LlavaOnevisionDummyInputsBuilder):
    """`<image>` and `<video>` placeholders, images at the tower's size, the longest videos."""


class _VideoLlavaImageKey(BaseMultiModalProcessor):
    """Video-LLaVA's HF processor names image pixels ``pixel_values_images``; the shared image
    path reads ``pixel_values``."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        processed = super()._call_hf_processor(hf_data, hf_kwargs)
        if "pixel_values_images" in processed:
            processed["pixel_values"] = processed.pop("pixel_values_images")
        return processed


class PruMergeVideoLlavaMultiModalProcessor(
    PruMergeVideoProcessorMixin, PruMergeLlavaMultiModalProcessor, _VideoLlavaImageKey
):
    def _encode_frames(
        self, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[torch.Tensor], float]:
        if config.enabled:
            return super()._encode_frames(pixel_values, config)
        # transformers' stock video features: no select strategy, the CLS row stays.
        return self.info.video_encoder.hidden_states(pixel_values)


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeVideoLlavaMultiModalProcessor,
    info=PruMergeVideoLlavaProcessingInfo,
    dummy_inputs=PruMergeVideoLlavaDummyInputsBuilder,
)
class PruMergeVideoLlavaForConditionalGeneration(
    PruMergeVideoModelMixin, LlavaForConditionalGeneration
):
    """Video-LLaVA whose images and video frames arrive as PruMerge-reduced tower features:
    projector + LLM only."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError("Only image or video modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        self._init_without_tower(vllm_config, prefix)

    def get_patches_per_frame(self) -> int:
        return super().get_patches_per_frame() + 1  # the CLS row of each stock frame

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        return self._project([frames.flatten(0, 1)])[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Both towers run in the pre-processor (PruMergeEncoder).
        towers = (*tower_prefixes(IMAGE_TOWER), *tower_prefixes(VIDEO_TOWER))
        return super().load_weights((n, w) for n, w in weights if not n.startswith(towers))
