"""LLaVA-OneVision images and videos with PruMerge: the LLaVA-NeXT per-crop semantics on a SigLIP
tower, and the same per frame.

Images: each crop (base view first, then the anyres tiles row-major) is reduced on its own with
the tower's importance (received attention: SigLIP has no CLS) and contributes its kept tokens
plus its own extra token; no unpadding, no newline, no ``anyres_max`` downscaling in reduced
modes. ``off`` is stock vLLM LLaVA-OneVision for images (unpadding, ``anyres_max_9``
interpolation, newlines), packed in the engine by vLLM's own merge.

Videos (see :mod:`vllm_prumerge.serving.video`): each frame reduced as a LLaVA-1.5 image, frames
in time order, no pooling and no newline: ``sum over frames (kept_f + 1)`` tokens. ``off`` is stock
vLLM: projector, vLLM's own bilinear 2x2 pooling and one ``image_newline`` per video
(``frames * 196 + 1`` tokens for SigLIP 384/14).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import BatchFeature
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor

from vllm_prumerge.serving.llava_next import (
    AnyresModelMixin,
    AnyresProcessingInfoMixin,
    AnyresProcessorMixin,
)
from vllm_prumerge.serving.video import (
    PruMergeVideoModelMixin,
    PruMergeVideoProcessingInfoMixin,
    PruMergeVideoProcessorMixin,
)


class PruMergeLlavaOnevisionProcessingInfo(
    PruMergeVideoProcessingInfoMixin, AnyresProcessingInfoMixin, LlavaOnevisionProcessingInfo
):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}


class PruMergeLlavaOnevisionDummyInputsBuilder(LlavaOnevisionDummyInputsBuilder):
    pass


class PruMergeLlavaOnevisionMultiModalProcessor(
    PruMergeVideoProcessorMixin, AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor
):
    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # vLLM's OneVision processor calls the HF processor itself (for its video path); the
        # generic path goes through our _call_hf_processor, which handles both modalities.
        return BaseMultiModalProcessor._apply_hf_processor_main(self, mm_items, hf_kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeLlavaOnevisionMultiModalProcessor,
    info=PruMergeLlavaOnevisionProcessingInfo,
    dummy_inputs=PruMergeLlavaOnevisionDummyInputsBuilder,
)
class PruMergeLlavaOnevisionForConditionalGeneration(
    PruMergeVideoModelMixin, AnyresModelMixin, LlavaOnevisionForConditionalGeneration
):
    """LLaVA-OneVision whose image crops and video frames arrive as PruMerge-reduced tower
    features."""

    def _pack_stock(self, image_size: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(
            image_size,
            crops,
            image_newline=self.image_newline,
            vision_aspect_ratio=getattr(self.config, "vision_aspect_ratio", "anyres_max_9"),
            strategy="spatial_unpad",
        )

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        # vLLM's order: projector, then 2x2 bilinear pooling, then one newline per video.
        projected = self._project([frames.flatten(0, 1)])[0].view(*frames.shape[:2], -1)
        pooled = self.apply_pooling(projected)  # [T, 196, H]
        newline = self.image_newline[None].to(pooled.dtype)
        return torch.cat((pooled.flatten(0, 1), newline))
