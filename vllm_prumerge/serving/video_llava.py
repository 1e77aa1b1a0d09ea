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

from collections.abc import Mapping
from types import MappingProxyType

import torch
from PIL import Image
from transformers import BatchFeature, VideoLlavaConfig, VideoLlavaProcessor
from vllm.model_executor.models.llava import (
    BaseLlavaProcessingInfo,
    LlavaForConditionalGeneration,
)
from vllm.model_executor.models.llava_onevision import LlavaOnevisionDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.serving.llava import PruMergeLlavaMultiModalProcessor
from vllm_prumerge.serving.video import (
    PruMergeVideoModelMixin,
    PruMergeVideoProcessingInfoMixin,
    PruMergeVideoProcessorMixin,
)
from vllm_prumerge.vision import num_patches

# The checkpoint's tower of each modality.
TOWERS = MappingProxyType({"image": "image_tower", "video": "video_tower"})


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
        return num_frames * (num_patches(self.get_hf_config().vision_config) + 1)


class PruMergeVideoLlavaProcessingInfo(PruMergeVideoProcessingInfoMixin, VideoLlavaProcessingInfo):
    towers = TOWERS

    def get_max_image_tokens(self) -> int:
        # An image is reduced as one frame: every patch kept plus the extra token.
        return self.get_max_frame_tokens()


class PruMergeVideoLlavaDummyInputsBuilder(LlavaOnevisionDummyInputsBuilder):
    """`<image>` and `<video>` placeholders, images at the tower's size, the longest videos."""


class StatedImageLayoutMixin:
    """Tells transformers' Video-LLaVA image processor that PIL images are channels-last.

    Its (numpy) image processor guesses the channel axis from the array's shape, and a 1x1
    image, ``(1, 1, 3)``, reads as channels-first (then fails: "mean must have 1 elements"),
    where every other family's processor serves it. vLLM hands the HF processor the PIL images
    it decoded (and its dummy inputs are PIL images), always ``(H, W, 3)`` as arrays; other
    image types are left to transformers' guess, as before.
    """

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        images = hf_data.get("images") or []
        if images and all(isinstance(image, Image.Image) for image in images):
            hf_kwargs = {**hf_kwargs, "input_data_format": "channels_last"}
        return super()._call_hf_processor(hf_data, hf_kwargs)


class PruMergeVideoLlavaMultiModalProcessor(
    PruMergeVideoProcessorMixin, StatedImageLayoutMixin, PruMergeLlavaMultiModalProcessor
):
    image_pixels_key = "pixel_values_images"

    def _encode_frames(
        self, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[torch.Tensor], float]:
        if config.enabled:
            return super()._encode_frames(pixel_values, config)
        # transformers' stock video features: no select strategy, the CLS row stays.
        return self.info.encoders["video"].hidden_states(pixel_values)


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

    towers = TOWERS

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        # [T, N + 1, C]: every frame's patches with its CLS row.
        return self._project([frames.flatten(0, 1)])[0]
