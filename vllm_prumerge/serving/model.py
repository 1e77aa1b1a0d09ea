"""LLaVA-1.5 with PruMerge for vLLM: the four pieces of a vLLM multimodal model, in vLLM's order.

Design: the exact reduced token count of an image is known only after the CLIP tower has run,
but vLLM fixes a request's placeholder tokens when it pre-processes the prompt, before
scheduling. So the pre-processor (front-end process) runs the tower and the reduction
(:class:`vllm_prumerge.encoder.PruMergeEncoder`) and sets each image's placeholders to the
length of its reduced features; the model in the engine only applies LLaVA's projector to those
features and never builds the tower. The scheduler and the paged KV cache therefore see the
reduced, per-image count, and vLLM's processor cache (keyed by image + request options) reuses
the features of repeated images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Annotated, Literal

import torch
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.logger import init_logger
from vllm.model_executor.models.llava import (
    BaseLlavaMultiModalProcessor,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProjector,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.encoder import PruMergeEncoder
from vllm_prumerge.serving import metrics
from vllm_prumerge.serving.options import (
    CONFIG_KEY,
    PROFILE_KEY,
    describe,
    engine_config,
    request_config,
)

# Under "vllm." so that vLLM's logging configuration prints it like its own messages.
logger = init_logger("vllm.prumerge")

FEATURES_KEY = "prumerge_features"


def _check_supported(hf_config) -> None:
    """PruMerge needs a LLaVA-1.5-style config: CLIP tower, one feature layer, no CLS token."""
    vision = getattr(hf_config, "vision_config", None)
    if not isinstance(vision, CLIPVisionConfig):
        raise ValueError(
            "vllm-prumerge serves LLaVA checkpoints with a CLIP vision tower "
            f"(e.g. llava-hf/llava-1.5-7b-hf); this model's vision_config is "
            f"{type(vision).__name__}"
        )
    if getattr(hf_config, "vision_feature_select_strategy", "default") != "default":
        raise ValueError(
            "vllm-prumerge supports vision_feature_select_strategy='default' (patch tokens "
            f"without CLS), got {hf_config.vision_feature_select_strategy!r}"
        )


class PruMergeImageFeatureInputs(TensorSchema):
    """Reduced CLIP-space features of a batch of images.

    Dimensions:
        - bn: Batch size * number of images
        - nt: Visual tokens of an image after PruMerge (differs from image to image)
        - c: Vision tower width
    """

    type: Literal["prumerge_features"] = "prumerge_features"
    data: Annotated[
        torch.Tensor | list[torch.Tensor],
        TensorShape("bn", "nt", "c", dynamic_dims={"nt"}),
    ]


class PruMergeLlavaProcessingInfo(LlavaProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        # Our options are for our processor only; vLLM would pass them on to transformers.
        kwargs.pop(CONFIG_KEY, None)
        kwargs.pop(PROFILE_KEY, None)
        return super().get_hf_processor(**kwargs)

    @cached_property
    def engine_config(self) -> PruMergeConfig:
        hf_config = self.get_hf_config()
        _check_supported(hf_config)
        config = engine_config(hf_config)
        logger.info_once("PruMerge visual-token reduction: %s", describe(config))
        return config

    @cached_property
    def encoder(self) -> PruMergeEncoder:
        model_config = self.ctx.model_config
        hf_config = self.get_hf_config()
        return PruMergeEncoder(
            model_config.model,
            hf_config.vision_config,
            vision_feature_layer=hf_config.vision_feature_layer,
            dtype=model_config.dtype,
            revision=model_config.revision,
        )

    def get_num_patches(self) -> int:
        """Patch tokens of the stock model (576 for CLIP-L/14-336)."""
        return super().get_max_image_tokens()

    def get_max_image_tokens(self) -> int:
        # Every patch kept plus the extra token: the bound of every mode.
        return self.get_num_patches() + 1

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


class PruMergeLlavaDummyInputsBuilder(LlavaDummyInputsBuilder[PruMergeLlavaProcessingInfo]):
    pass


class PruMergeLlavaMultiModalProcessor(BaseLlavaMultiModalProcessor[PruMergeLlavaProcessingInfo]):
    def get_dummy_inputs(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> ProcessorInputs:
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(
            inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, PROFILE_KEY: True}
        )

    def _call_hf_processor(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        hf_kwargs = dict(hf_kwargs)
        config = request_config(self.info.engine_config, hf_kwargs.pop(CONFIG_KEY, None))
        dtype = self.info.ctx.model_config.dtype
        if hf_kwargs.pop(PROFILE_KEY, False):
            # Start-up profiling: worst-case length, no tower.
            width = self.info.get_hf_config().vision_config.hidden_size
            shape = (self.info.get_max_image_tokens(), width)
            return BatchFeature(
                {FEATURES_KEY: [torch.zeros(shape, dtype=dtype) for _ in hf_data["images"]]}
            )

        processed = super()._call_hf_processor(hf_data, hf_kwargs)
        pixel_values = processed.pop("pixel_values")
        encoded = self.info.encoder.encode(pixel_values, config)
        processed[FEATURES_KEY] = [f.to(dtype) for f in encoded.features]
        metrics.record(config.mode, [len(f) for f in encoded.features], encoded.seconds)
        return processed

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            FEATURES_KEY: MultiModalFieldConfig.batched("image"),
            "image_embeds": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index

        def get_replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                count = images.get_feature_size(item_idx)
            else:  # the exact reduced count of this image
                count = out_mm_kwargs["image"][item_idx][FEATURES_KEY].data.shape[0]
            return [image_token_id] * count

        return [
            PromptReplacement(
                modality="image", target=[image_token_id], replacement=get_replacement
            )
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeLlavaMultiModalProcessor,
    info=PruMergeLlavaProcessingInfo,
    dummy_inputs=PruMergeLlavaDummyInputsBuilder,
)
class PruMergeLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose images arrive as PruMerge-reduced CLIP features: projector + LLM only."""

    supports_tower_connector_lora = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # LlavaForConditionalGeneration.__init__ minus the vision tower, which runs in the
        # pre-processor instead.
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        _check_supported(config)
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size,
            mm_token_ids=[config.image_token_index],
        )
        logger.info("PruMerge visual-token reduction: %s", describe(engine_config(config)))

        with self._mark_tower_model(vllm_config, "image"):
            self.multi_modal_projector = LlavaMultiModalProjector(
                vision_hidden_size=config.vision_config.hidden_size,
                text_hidden_size=config.text_config.hidden_size,
                projector_hidden_act=config.projector_hidden_act,
                multimodal_projector_bias=config.multimodal_projector_bias,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "multi_modal_projector"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor] | torch.Tensor:
        features = kwargs.pop(FEATURES_KEY, None)
        if features is None:
            return super().embed_multimodal(**kwargs)  # precomputed image_embeds, or none
        inputs = PruMergeImageFeatureInputs(
            data=features, resolve_bindings={"c": self.config.vision_config.hidden_size}
        )
        per_image = list(inputs["data"])
        sizes = [f.shape[0] for f in per_image]
        weight = self.multi_modal_projector.linear_1.weight
        embeds = self.multi_modal_projector(torch.cat(per_image).to(weight.dtype))
        return list(torch.split(embeds, sizes))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The tower's tensors are the pre-processor's (PruMergeEncoder), not the engine's.
        kept = (
            (n, w) for n, w in weights if not n.startswith(("vision_tower.", "model.vision_tower."))
        )
        return AutoWeightsLoader(self).load_weights(kept, mapper=self.hf_to_vllm_mapper)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="multi_modal_projector"
        )
