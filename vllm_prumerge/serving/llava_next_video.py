"""LLaVA-NeXT-Video with PruMerge: vLLM's four pieces, in order; videos only, as vLLM's class.

Each frame is reduced as a LLaVA-1.5 image on the CLIP tower's full 24x24 grid (CLS attention by
default), frames in time order, no pooling: ``sum over frames (kept_f + 1)`` tokens per video
(see :mod:`vllm_prumerge.serving.video`). ``off`` is stock vLLM token for token: the resampler's
2x2 average pooling, then the projector, no newline (``frames * 144`` tokens for CLIP-L/14-336).
vLLM 0.32's class takes no images, so neither does this one (an image is refused by vLLM's own
input validation).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_next_video import (
    LlavaNextVideoDummyInputsBuilder,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoMultiModalProcessor,
    LlavaNextVideoProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_prumerge.serving.video import (
    PruMergeVideoModelMixin,
    PruMergeVideoProcessingInfoMixin,
    PruMergeVideoProcessorMixin,
)


class PruMergeLlavaNextVideoProcessingInfo(
    PruMergeVideoProcessingInfoMixin, LlavaNextVideoProcessingInfo
):
    pass


class PruMergeLlavaNextVideoDummyInputsBuilder(LlavaNextVideoDummyInputsBuilder):
    pass


class PruMergeLlavaNextVideoMultiModalProcessor(
    PruMergeVideoProcessorMixin, LlavaNextVideoMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeLlavaNextVideoMultiModalProcessor,
    info=PruMergeLlavaNextVideoProcessingInfo,
    dummy_inputs=PruMergeLlavaNextVideoDummyInputsBuilder,
)
class PruMergeLlavaNextVideoForConditionalGeneration(
    PruMergeVideoModelMixin, LlavaNextVideoForConditionalGeneration
):
    """LLaVA-NeXT-Video whose frames arrive as PruMerge-reduced tower features: projector (+
    stock pooling in ``off``) + LLM only."""

    modalities = frozenset({"video"})
    # In the checkpoint (transformers' class has it for images); unused by video, as in vLLM.
    unused_prefixes = ("image_newline",)

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        # vLLM's order: the resampler's pooling, then the projector.
        weight = self.multi_modal_projector.linear_1.weight
        pooled = self.vision_resampler(frames.to(weight.dtype))  # [T, 144, C]
        return self.multi_modal_projector(pooled).flatten(0, 1)
