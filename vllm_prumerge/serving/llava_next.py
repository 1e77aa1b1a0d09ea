"""LLaVA-NeXT (anyres) with PruMerge: vLLM's four pieces, in order; only the crops differ.

Semantics (per image): the crops in the order the checkpoint's image processor makes them (the
base view first, then the high-resolution tiles in row-major order) are one tower batch; each
crop is reduced on its own, exactly as a LLaVA-1.5 image (its own importance, IQR fence,
PruMerge+ samples, merge within the crop), and contributes its kept tokens followed by its own
extra token. Crops are concatenated in that order with no unpadding and no ``image_newline``, so
an image costs ``sum over crops (kept_c + 1)`` tokens (the convention of FasterVLM, VisionZip and
HiRED's PruMerge port). ``off`` is stock LLaVA-NeXT token for token: all crop features, packed by
vLLM's own ``spatial_unpad`` merge (unpadding and one newline per row) in the engine.

The three ``Anyres*Mixin`` classes hold what every anyres family shares (LLaVA-OneVision reuses
them in ``llava_onevision.py``); the family classes at the bottom put them in front of vLLM's.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.serving.base import (
    FEATURES_KEY,
    STOCK_KEYS,
    PruMergeModelMixin,
    PruMergeProcessingInfoMixin,
    PruMergeProcessorMixin,
    stock_field,
)

STOCK_CROPS_KEY = STOCK_KEYS["image"]


class AnyresProcessingInfoMixin(PruMergeProcessingInfoMixin):
    """Crop counts of anyres families (before a vLLM ``LlavaNextProcessingInfo`` subclass)."""

    def get_num_crops(self, *, image_width: int, image_height: int) -> int:
        """Base view + high-resolution tiles the image processor makes for this image size."""
        hf_config = self.get_hf_config()
        rows, cols = get_anyres_image_grid_shape(
            (image_height, image_width),
            hf_config.image_grid_pinpoints,
            hf_config.vision_config.image_size,
        )
        return 1 + rows * cols

    def get_max_crops(self) -> int:
        hf_config = self.get_hf_config()
        return max(
            self.get_num_crops(image_width=w, image_height=h)
            for h, w in hf_config.image_grid_pinpoints
        )

    def get_max_image_tokens(self) -> int:
        # Reduced modes: every patch of every crop kept plus one extra token per crop; `off`:
        # the stock count, at vLLM's worst-case size and at every pinpoint (vLLM's OneVision
        # hard-codes the worst-case size of the hub checkpoints' pinpoints, which other
        # pinpoints can exceed). The largest bounds every mode. Under an engine `max_tokens`
        # ceiling `off` is ruled out and every crop keeps at most that many.
        reduced = self.get_max_crops() * self.get_max_crop_tokens()
        if not self.stock_reachable:
            return reduced
        pinpoints = max(
            self.get_num_image_tokens(image_width=w, image_height=h)
            for h, w in self.get_hf_config().image_grid_pinpoints
        )
        return max(reduced, pinpoints, super().get_max_image_tokens())


class AnyresProcessorMixin(PruMergeProcessorMixin):
    """Per-crop reduction of anyres families (before a vLLM LLaVA-NeXT-style processor)."""

    image_fields = ("image_sizes",)

    def _reduce_images(
        self, processed: BatchFeature, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[int], float]:
        # pixel_values: [B, max_crops, 3, H, W] (zero-padded)
        sizes = [(int(h), int(w)) for h, w in processed["image_sizes"]]
        crops = [self.info.get_num_crops(image_width=w, image_height=h) for h, w in sizes]
        batch = torch.cat([pixel_values[i][:n] for i, n in enumerate(crops)])
        encoded = self.info.encoder.encode(batch, config)  # one row per crop
        per_crop = encoded.features
        features, counts, starts = [], [], 0
        for (h, w), n in zip(sizes, crops, strict=True):
            features.append(torch.cat(per_crop[starts : starts + n]))
            starts += n
            if config.enabled:
                counts.append(len(features[-1]))
            else:
                counts.append(self.info.get_num_image_tokens(image_width=w, image_height=h))
        processed[FEATURES_KEY] = features
        processed[STOCK_CROPS_KEY] = stock_field(0 if config.enabled else n for n in crops)
        return counts, encoded.seconds


class AnyresModelMixin(PruMergeModelMixin):
    """Reduced crops pass through; ``off`` crops are packed the family's stock way."""

    def _pack_stock(self, image_size: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """``[K, N, H]`` projected crop features -> the family's stock packed ``[L, H]``."""
        return self._merge_image_patch_embeddings(image_size, crops, strategy="spatial_unpad")

    def _embed_features(
        self, per_image: list[torch.Tensor], stock: list[int], kwargs: dict[str, object]
    ) -> list[torch.Tensor]:
        embeds = self._project(per_image)
        image_sizes = kwargs.get("image_sizes")
        for i, crops in enumerate(stock):
            if crops > 0:
                tiles = embeds[i].view(crops, -1, embeds[i].shape[-1])
                embeds[i] = self._pack_stock(torch.as_tensor(image_sizes[i]), tiles)
        return embeds


class PruMergeLlavaNextProcessingInfo(AnyresProcessingInfoMixin, LlavaNextProcessingInfo):
    pass


class PruMergeLlavaNextDummyInputsBuilder(LlavaDummyInputsBuilder[PruMergeLlavaNextProcessingInfo]):
    pass


class PruMergeLlavaNextMultiModalProcessor(
    AnyresProcessorMixin, LlavaNextMultiModalProcessor[PruMergeLlavaNextProcessingInfo]
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeLlavaNextMultiModalProcessor,
    info=PruMergeLlavaNextProcessingInfo,
    dummy_inputs=PruMergeLlavaNextDummyInputsBuilder,
)
class PruMergeLlavaNextForConditionalGeneration(
    AnyresModelMixin, LlavaNextForConditionalGeneration
):
    """LLaVA-NeXT whose crops arrive as PruMerge-reduced tower features: projector (+ stock
    anyres packing in ``off``) + LLM only."""
