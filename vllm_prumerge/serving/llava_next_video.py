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
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_next_video import (
    LlavaNextVideoDummyInputsBuilder,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoMultiModalProcessor,
    LlavaNextVideoPooler,
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

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        self._init_without_tower(vllm_config, prefix)

    def _init_family_parameters(self, config) -> None:
        self.vision_resampler = LlavaNextVideoPooler(config)
        # In the checkpoint (transformers' class has it for images); unused by video.
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def _pack_stock_video(self, frames: torch.Tensor) -> torch.Tensor:
        # vLLM's order: the resampler's pooling, then the projector.
        weight = self.multi_modal_projector.linear_1.weight
        pooled = self.vision_resampler(frames.to(weight.dtype))  # [T, 144, C]
        return self.multi_modal_projector(pooled).flatten(0, 1)
