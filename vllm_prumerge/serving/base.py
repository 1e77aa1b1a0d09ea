"""What every PruMerge family adapter shares: the three vLLM pieces, minus the family specifics.

Design: the exact reduced token count of an image is known only after the vision tower has run,
but vLLM fixes a request's placeholder tokens when it pre-processes the prompt, before
scheduling. So the pre-processor (front-end process) runs the tower and the reduction
(:class:`vllm_prumerge.encoder.PruMergeEncoder`) and sets each image's placeholders to the
length of its reduced features; the model in the engine only applies the family's projector
(and packing) to those features and never builds the tower. The scheduler and the paged KV
cache therefore see the reduced, per-image count, and vLLM's processor cache (keyed by image +
request options) reuses the features of repeated images.

Each family file (``llava.py``, ``llava_next.py``, ``llava_onevision.py``) mixes these classes in
front of vLLM's own classes for that family, in vLLM's order (processing info, processor, model),
and holds only what differs: how crops are cut, counted and packed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Annotated, Literal

import torch
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.logger import init_logger
from vllm.model_executor.models.llava import LlavaMultiModalProjector
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.encoder import (
    PruMergeEncoder,
    TowerThreads,
    choose_tower_threads,
    supported_vision_config,
)
from vllm_prumerge.hub_layout import VISION_TOWER
from vllm_prumerge.serving import metrics
from vllm_prumerge.serving.options import (
    CONFIG_KEY,
    DOWNLOAD_DIR_KEY,
    PROFILE_KEY,
    api_server_count,
    describe,
    engine_config,
    request_config,
    tower_dtype_setting,
    tower_threads_setting,
)
from vllm_prumerge.vision import resolve_vision_feature_layer
from vllm_prumerge.vision.precision import TowerPrecision, choose_tower_dtype, cpu_description

# Under "vllm." so that vLLM's logging configuration prints it like its own messages.
logger = init_logger("vllm.prumerge")

FEATURES_KEY = "prumerge_features"


def check_supported(hf_config) -> None:
    """PruMerge needs a CLIP tower with the "default" strategy (CLS dropped) or a SigLIP tower
    with "full" (no CLS to drop), and one feature layer. Raises ValueError naming the problem."""
    vision = getattr(hf_config, "vision_config", None)
    if not supported_vision_config(vision):
        raise ValueError(
            "vllm-prumerge serves LLaVA checkpoints with a CLIP or SigLIP vision tower; this "
            f"model's vision_config is {type(vision).__name__}"
        )
    expected = "default" if isinstance(vision, CLIPVisionConfig) else "full"
    strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
    if strategy != expected:
        raise ValueError(
            f"vllm-prumerge supports vision_feature_select_strategy={expected!r} for a "
            f"{type(vision).__name__} tower (patch tokens only), got {strategy!r}"
        )
    try:
        resolve_vision_feature_layer(hf_config.vision_feature_layer, vision.num_hidden_layers)
    except TypeError as exc:
        raise ValueError(f"vllm-prumerge: {exc}") from None


class PruMergeImageFeatureInputs(TensorSchema):
    """Reduced tower-space features of a batch of images.

    Dimensions:
        - bn: Batch size * number of images
        - nt: Tower-space tokens of an image (differs from image to image)
        - c: Vision tower width
    """

    type: Literal["prumerge_features"] = "prumerge_features"
    data: Annotated[
        torch.Tensor | list[torch.Tensor],
        TensorShape("bn", "nt", "c", dynamic_dims={"nt"}),
    ]


class PruMergeProcessingInfoMixin:
    """Goes in front of a family's vLLM ProcessingInfo: options, encoder, token bounds."""

    #: The checkpoint's tower for images (Video-LLaVA: ``image_tower``).
    image_tower: str = VISION_TOWER

    def get_hf_processor(self, **kwargs: object):
        # Our options are for our processor only; vLLM would pass them on to transformers.
        kwargs.pop(CONFIG_KEY, None)
        kwargs.pop(PROFILE_KEY, None)
        return super().get_hf_processor(**kwargs)

    @cached_property
    def engine_config(self) -> PruMergeConfig:
        hf_config = self.get_hf_config()
        check_supported(hf_config)
        config = engine_config(hf_config)
        logger.info_once("PruMerge visual-token reduction: %s", describe(config))
        self.tower_precision  # noqa: B018  logs the tower's dtype at start-up, with the mode
        self.tower_threads  # noqa: B018  and its thread count
        return config

    @cached_property
    def tower_device(self) -> torch.device:
        """Where the pre-processor runs the tower: the GPU when there is one."""
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @cached_property
    def tower_precision(self) -> TowerPrecision:
        """The tower's compute dtype (engine option `tower_dtype`) for this machine."""
        precision = choose_tower_dtype(
            tower_dtype_setting(self.get_hf_config()),
            self.ctx.model_config.dtype,
            self.tower_device,
        )
        machine = cpu_description() if self.tower_device.type == "cpu" else self.tower_device
        logger.info_once("PruMerge vision tower: %s [%s]", precision.describe(), machine)
        return precision

    @cached_property
    def tower_threads(self) -> TowerThreads:
        """The tower's torch thread count (engine option `tower_threads`) for this machine."""
        hf_config = self.get_hf_config()
        threads = choose_tower_threads(
            tower_threads_setting(hf_config),
            self.tower_device,
            api_servers=api_server_count(hf_config),
        )
        logger.info_once("PruMerge vision tower threads: %s", threads.describe())
        return threads

    @cached_property
    def encoder(self) -> PruMergeEncoder:
        """The tower + reduction of images (and, in most families, of video frames)."""
        return self.make_encoder(self.image_tower)

    def make_encoder(self, tower: str) -> PruMergeEncoder:
        """An encoder of the checkpoint's tower named `tower` (loaded on first use)."""
        model_config = self.ctx.model_config
        hf_config = self.get_hf_config()
        return PruMergeEncoder(
            model_config.model,
            hf_config.vision_config,
            vision_feature_layer=hf_config.vision_feature_layer,
            dtype=self.tower_precision.dtype,
            device=self.tower_device,
            revision=model_config.revision,
            download_dir=getattr(hf_config, DOWNLOAD_DIR_KEY, None),
            token=model_config.hf_token,
            num_threads=self.tower_threads.count,  # VLLM_PRUMERGE_TOWER_THREADS overrides
            tower_name=tower,
        )

    def get_patches_per_crop(self) -> int:
        """Tower patches of one image or crop (576 for CLIP-L/14-336, 729 for SigLIP 384/14)."""
        vision = self.get_hf_config().vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}

    @cached_property
    def largest_item_tokens(self) -> int:
        """Worst-case tokens of one item of any modality the model accepts, in any mode
        (``off`` included): the top of the visual-token histogram's buckets."""
        modalities = self.get_supported_mm_limits()
        seq_len = self.ctx.model_config.max_model_len
        return max(self.get_mm_max_tokens_per_item(seq_len, dict.fromkeys(modalities, 1)).values())


class PruMergeProcessorMixin:
    """Goes in front of a family's vLLM multimodal processor: runs the tower + reduction.

    Families implement :meth:`_reduce_images` (pixel values -> per-image features and fields)
    and :meth:`_profile_features`, and may refine :meth:`_num_placeholders`.
    """

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
        if "pixel_values" not in processed:  # text only
            return processed
        counts, seconds = self._reduce_images(processed, config)
        # The tower's dtype may differ from the model's (tower_dtype): the engine gets the model's.
        processed[FEATURES_KEY] = [f.to(dtype) for f in processed[FEATURES_KEY]]
        metrics.record(
            config.mode, counts, seconds, largest=self.info.largest_item_tokens, modality="image"
        )
        return processed

    def _reduce_images(
        self, processed: BatchFeature, config: PruMergeConfig
    ) -> tuple[list[int], float]:
        """Replace `processed["pixel_values"]` by `processed[FEATURES_KEY]` (one `[L_i, C]`
        tensor per image, plus any family fields); return the visual tokens per image and the
        tower + reduction seconds."""
        raise NotImplementedError

    def _num_placeholders(self, item, image_size) -> int:
        """Placeholder tokens of one processed image: its feature rows, by default."""
        return item[FEATURES_KEY].data.shape[0]

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
                item = out_mm_kwargs["image"][item_idx]
                count = self._num_placeholders(item, images.get_image_size(item_idx))
            return [image_token_id] * count

        return [
            PromptReplacement(
                modality="image", target=[image_token_id], replacement=get_replacement
            )
        ]


class PruMergeModelMixin:
    """Goes in front of a family's vLLM model class: no tower; features -> projector -> LLM."""

    supports_tower_connector_lora = False
    #: The modalities whose features the projector takes (``{"image", "video"}`` for video
    #: families): vLLM skips tower modules when every one of them is limited to zero items.
    modalities: frozenset[str] = frozenset({"image"})

    def _init_without_tower(self, vllm_config: VllmConfig, prefix: str) -> None:
        """The family's ``__init__`` minus the vision tower, which runs in the pre-processor:
        config, multimodal token handling, projector (in the tower slot) and language model."""
        config = vllm_config.model_config.hf_config
        check_supported(config)
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        token_ids = [config.image_token_index]
        if "video" in self.modalities:
            token_ids.append(config.video_token_index)
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=token_ids
        )
        logger.info("PruMerge visual-token reduction: %s", describe(engine_config(config)))
        with self._mark_tower_model(vllm_config, set(self.modalities)):
            self.multi_modal_projector = LlavaMultiModalProjector(
                vision_hidden_size=config.vision_config.hidden_size,
                text_hidden_size=config.text_config.hidden_size,
                projector_hidden_act=config.projector_hidden_act,
                multimodal_projector_bias=config.multimodal_projector_bias,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "multi_modal_projector"),
            )
            self._init_family_parameters(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _init_family_parameters(self, config) -> None:
        """Extra connector parameters of a family (e.g. LLaVA-NeXT's ``image_newline``)."""

    def _project(self, per_image: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[L_i, C]`` tower-space features -> ``[L_i, H]`` LLM embeddings, one projector call."""
        sizes = [f.shape[0] for f in per_image]
        weight = self.multi_modal_projector.linear_1.weight
        embeds = self.multi_modal_projector(torch.cat(per_image).to(weight.dtype))
        return list(torch.split(embeds, sizes))

    def _embed_features(
        self, per_image: list[torch.Tensor], kwargs: dict[str, object]
    ) -> list[torch.Tensor]:
        """Per-image LLM embeddings from per-image features; families may pack them."""
        return self._project(per_image)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor] | torch.Tensor:
        features = kwargs.pop(FEATURES_KEY, None)
        if features is None:
            return super().embed_multimodal(**kwargs)  # precomputed image_embeds, or none
        inputs = PruMergeImageFeatureInputs(
            data=features, resolve_bindings={"c": self.config.vision_config.hidden_size}
        )
        return self._embed_features(list(inputs["data"]), kwargs)

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
