"""LLaVA-1.5 and SigLIP-based LLaVA (LLaVA-Interleave) with PruMerge: vLLM's four pieces, in order.

One image is one tower input: its reduced features are its visual tokens (kept tokens + the
extra token; ``off``: the stock patch features, 576 for CLIP-L/14-336, 729 for SigLIP 384/14).
See :mod:`vllm_prumerge.serving.base` for the design.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature
from vllm.model_executor.models.llava import (
    BaseLlavaMultiModalProcessor,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.serving.base import (
    FEATURES_KEY,
    PruMergeModelMixin,
    PruMergeProcessingInfoMixin,
    PruMergeProcessorMixin,
)


class PruMergeLlavaProcessingInfo(PruMergeProcessingInfoMixin, LlavaProcessingInfo):
    def get_max_image_tokens(self) -> int:
        # Every patch kept (at most max_tokens) plus the extra token: the bound of every mode
        # (the stock count, N, is below N + 1; an engine ceiling rules `off` out).
        return self.get_max_crop_tokens()


class PruMergeLlavaDummyInputsBuilder(LlavaDummyInputsBuilder[PruMergeLlavaProcessingInfo]):
    pass


class PruMergeLlavaMultiModalProcessor(
    PruMergeProcessorMixin, BaseLlavaMultiModalProcessor[PruMergeLlavaProcessingInfo]
):
    def _reduce_images(
        self, processed: BatchFeature, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[int], float]:
        encoded = self.info.encoder.encode(pixel_values, config)
        processed[FEATURES_KEY] = encoded.features
        return [len(f) for f in encoded.features], encoded.seconds


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeLlavaMultiModalProcessor,
    info=PruMergeLlavaProcessingInfo,
    dummy_inputs=PruMergeLlavaDummyInputsBuilder,
)
class PruMergeLlavaForConditionalGeneration(PruMergeModelMixin, LlavaForConditionalGeneration):
    """LLaVA whose images arrive as PruMerge-reduced tower features: projector + LLM only."""
