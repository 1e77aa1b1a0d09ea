"""What every PruMerge family adapter shares: the three vLLM pieces, minus the family specifics.

Design: the exact reduced token count of an image is known only after the vision tower has run,
but vLLM fixes a request's placeholder tokens when it pre-processes the prompt, before
scheduling. So the pre-processor (front-end process) runs the tower and the reduction
(:class:`vllm_prumerge.encoder.PruMergeEncoder`) and sets each image's placeholders to the
length of its reduced features; the model in the engine only applies the family's projector
(and packing) to those features and never builds the tower. The scheduler and the paged KV
cache therefore see the reduced, per-image count, and vLLM's processor cache (keyed by image +
request options) reuses the features of repeated images.

Each family file (``llava.py``, ``llava_next.py``, ``llava_onevision.py``, ...) mixes these classes
in front of vLLM's own classes for that family, in vLLM's order (processing info, processor,
model), and holds only what differs: how crops are cut, counted and packed. The model is built by
vLLM's own constructor, with the checkpoint's towers left out (:class:`PruMergeModelMixin`).

Per modality, the processor hands the engine two fields: each item's ``[L, C]`` tower-space
features (:data:`FEATURES_KEYS`) and, in families that pack ``off`` items the stock way, the
stock side channel (:data:`STOCK_KEYS`): the crops or frames of the item whose full features the
engine packs as stock vLLM does, or 0 when the features are already the reduced tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from types import MappingProxyType
from typing import Annotated, Literal

import torch
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.logger import init_logger
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader, StageMissingLayer
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
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
from vllm_prumerge.hub_layout import SHARED_TOWER, tower_prefixes
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
from vllm_prumerge.vision import num_patches, resolve_vision_feature_layer
from vllm_prumerge.vision.precision import TowerPrecision, choose_tower_dtype, cpu_description

# Under "vllm." so that vLLM's logging configuration prints it like its own messages.
logger = init_logger("vllm.prumerge")

# Per image: `[L_i, C]` tower-space features (reduced crops concatenated, or `off`: the stock
# features); per video: the same of its frames.
FEATURES_KEY = "prumerge_features"
VIDEO_FEATURES_KEY = "prumerge_video_features"
FEATURES_KEYS = MappingProxyType({"image": FEATURES_KEY, "video": VIDEO_FEATURES_KEY})
# The stock side channel, per item: the crops (images) or frames (videos) whose full features the
# engine packs the stock way (`off`), or 0 when the features are already the reduced tokens.
STOCK_KEYS = MappingProxyType({"image": "prumerge_stock_crops", "video": "prumerge_stock_frames"})
# The order of the modalities in `embed_multimodal`'s output when a call carries several (vLLM
# 0.32 batches one modality per call, `group_and_batch_mm_kwargs`: the order is then moot).
MODALITY_ORDER = ("image", "video")


def stock_field(units: Iterable[int]) -> torch.Tensor:
    """The stock side channel of a batch of items: `[B]` int64, 0 for a reduced item."""
    return torch.tensor(list(units), dtype=torch.int64)


def stock_units(item, modality: str) -> int:
    """The crops or frames a processed item packs the stock way (0: reduced, or no channel)."""
    key = STOCK_KEYS[modality]
    return int(item[key].data) if key in item else 0


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
    """Goes in front of a family's vLLM ProcessingInfo: options, encoders, token bounds."""

    #: The checkpoint's tower of each modality (a family with a tower per modality maps each).
    towers: Mapping[str, str] = SHARED_TOWER

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
    def encoders(self) -> Mapping[str, PruMergeEncoder]:
        """The tower + reduction of each modality: one encoder per checkpoint tower (loaded on
        first use), shared by the modalities that share the tower."""
        built = {tower: self.make_encoder(tower) for tower in dict.fromkeys(self.towers.values())}
        return MappingProxyType({m: built[tower] for m, tower in self.towers.items()})

    @property
    def encoder(self) -> PruMergeEncoder:
        """The tower + reduction of images."""
        return self.encoders["image"]

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
        return num_patches(self.get_hf_config().vision_config)

    def get_max_crop_tokens(self) -> int:
        """A reduced image's, crop's or frame's worst case: every patch kept, or at most the
        engine's ``max_tokens``, plus its extra token (577 for CLIP-L/14-336 without a ceiling)."""
        patches = self.get_patches_per_crop()
        ceiling = self.engine_config.max_tokens
        return (patches if ceiling is None else min(patches, ceiling)) + 1

    @property
    def stock_reachable(self) -> bool:
        """Whether an item may take the family's stock count (mode ``off``): not under an
        engine-level ``max_tokens`` ceiling, which requests may not lift (see
        :func:`~vllm_prumerge.serving.options.request_config`)."""
        return self.engine_config.max_tokens is None

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

    Families implement :meth:`_reduce_images` (pixel values -> per-image features and fields).
    """

    #: The HF processor's output field of image pixels.
    image_pixels_key: str = "pixel_values"
    #: The HF processor's per-image fields the engine needs too (e.g. anyres' ``image_sizes``).
    image_fields: tuple[str, ...] = ()

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
        if self.image_pixels_key not in processed:  # text only
            return processed
        counts, seconds = self._reduce_images(
            processed, processed.pop(self.image_pixels_key), config
        )
        # The tower's dtype may differ from the model's (tower_dtype): the engine gets the model's.
        processed[FEATURES_KEY] = [f.to(dtype) for f in processed[FEATURES_KEY]]
        metrics.record(
            config.mode, counts, seconds, largest=self.info.largest_item_tokens, modality="image"
        )
        return processed

    def _reduce_images(
        self, processed: BatchFeature, pixel_values: torch.Tensor, config: PruMergeConfig
    ) -> tuple[list[int], float]:
        """Set `processed[FEATURES_KEY]` from the images' `pixel_values` (one `[L_i, C]` tensor
        per image, plus any family fields); return the visual tokens per image and the tower +
        reduction seconds."""
        raise NotImplementedError

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        """Per supported modality: features and the stock side channel (kept on the CPU); for
        images also precomputed ``image_embeds``, and the HF processor's `image_fields`."""
        fields = {}
        for modality in MODALITY_ORDER:
            if modality in self.info.get_supported_mm_limits():
                fields[FEATURES_KEYS[modality]] = MultiModalFieldConfig.batched(modality)
                fields[STOCK_KEYS[modality]] = MultiModalFieldConfig.batched(
                    modality, keep_on_cpu=True
                )
        if "image" in self.info.get_supported_mm_limits():
            fields["image_embeds"] = MultiModalFieldConfig.batched("image")
            for key in self.image_fields:
                fields[key] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _stock_tokens(
        self, modality: str, units: int, mm_items: MultiModalDataItems, item_idx: int
    ) -> int:
        """Placeholder tokens of an item whose `units` crops or frames are packed the stock way:
        the family's stock count (of an image, here; the video mixin counts videos)."""
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)

    def _num_placeholders(
        self, modality: str, mm_items: MultiModalDataItems, item_idx: int, out_mm_kwargs
    ) -> int:
        """Placeholder tokens of one item: the size of precomputed embeddings, the stock count of
        an item packed the stock way, else the exact (reduced) rows of its features."""
        items = mm_items[modality]
        if isinstance(items, ImageEmbeddingItems):
            return items.get_feature_size(item_idx)
        item = out_mm_kwargs[modality][item_idx]
        units = stock_units(item, modality)
        if units > 0:
            return self._stock_tokens(modality, units, mm_items, item_idx)
        return item[FEATURES_KEYS[modality]].data.shape[0]

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        hf_config = self.info.get_hf_config()
        supported = self.info.get_supported_mm_limits()
        token_ids = {m: getattr(hf_config, f"{m}_token_index") for m in supported}

        def replacement(modality: str):
            def get_replacement(item_idx: int) -> list[int]:
                count = self._num_placeholders(modality, mm_items, item_idx, out_mm_kwargs)
                return [token_ids[modality]] * count

            return get_replacement

        return [
            PromptReplacement(modality=m, target=[token_ids[m]], replacement=replacement(m))
            for m in MODALITY_ORDER
            if m in token_ids
        ]


class PruMergeModelMixin:
    """Goes in front of a family's vLLM model class: no tower; features -> projector -> LLM.

    The one constructor of every family: vLLM's own, with the checkpoint's vision tower left out
    (it runs in the pre-processor): the tower vLLM builds is dropped to the meta device as it is
    assigned, so the model holds config, token handling, projector (and the family's connector
    parameters) and language model exactly as vLLM sets them.
    """

    supports_tower_connector_lora = False
    #: The modalities whose features the projector takes (``{"image", "video"}`` for video
    #: families): vLLM skips tower modules when every one of them is limited to zero items.
    modalities: frozenset[str] = frozenset({"image"})
    #: The checkpoint's tower of each modality (a family with a tower per modality maps each).
    towers: Mapping[str, str] = SHARED_TOWER
    #: Checkpoint tensors the family's model has no place for (besides the towers).
    unused_prefixes: tuple[str, ...] = ()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        check_supported(config)
        logger.info("PruMerge visual-token reduction: %s", describe(engine_config(config)))
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM's video families leave their tokens out of this check; the placeholders are ours.
        token_ids = [config.image_token_index]
        if "video" in self.modalities:
            token_ids.append(config.video_token_index)
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=token_ids
        )

    @contextmanager
    def _mark_tower_model(self, vllm_config: VllmConfig, modalities, **kwargs) -> Iterator[None]:
        """vLLM's, for every modality the projector serves, with the vision tower dropped."""

        def drop_tower(module: nn.Module, name: str, child: nn.Module) -> nn.Module:
            if module is not self or name != "vision_tower" or isinstance(child, StageMissingLayer):
                return child
            return StageMissingLayer("vision_tower", child.to("meta"))  # frees its memory

        with (
            super()._mark_tower_model(vllm_config, set(self.modalities), **kwargs),
            nn.modules.module.register_module_module_registration_hook(drop_tower),
        ):
            yield

    def _project(self, per_image: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[L_i, C]`` tower-space features -> ``[L_i, H]`` LLM embeddings, one projector call."""
        sizes = [f.shape[0] for f in per_image]
        weight = self.multi_modal_projector.linear_1.weight
        embeds = self.multi_modal_projector(torch.cat(per_image).to(weight.dtype))
        return list(torch.split(embeds, sizes))

    def _embed_features(
        self, per_image: list[torch.Tensor], stock: list[int], kwargs: dict[str, object]
    ) -> list[torch.Tensor]:
        """Per-image LLM embeddings from per-image features; families may pack them."""
        return self._project(per_image)

    def _embed_videos(
        self, per_video: list[torch.Tensor], stock: list[int], kwargs: dict[str, object]
    ) -> list[torch.Tensor]:
        """Per-video LLM embeddings from per-video features (the video mixin's)."""
        raise NotImplementedError

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor] | torch.Tensor:
        """The items' LLM embeddings, modalities in :data:`MODALITY_ORDER` (images, then videos);
        precomputed ``image_embeds`` go through vLLM's own path."""
        parts = []
        for modality in MODALITY_ORDER:
            features = kwargs.pop(FEATURES_KEYS[modality], None)
            stock = kwargs.pop(STOCK_KEYS[modality], None)
            if features is not None:
                parts.append(self._embed_modality(modality, features, stock, kwargs))
        if not parts:
            return super().embed_multimodal(**kwargs)  # precomputed image_embeds, or none
        return parts[0] if len(parts) == 1 else [e for part in parts for e in part]

    def _embed_modality(
        self, modality: str, features: object, stock: object, kwargs: dict[str, object]
    ) -> list[torch.Tensor]:
        inputs = PruMergeImageFeatureInputs(
            data=features, resolve_bindings={"c": self.config.vision_config.hidden_size}
        )
        per_item = list(inputs["data"])
        # Start-up profiling carries no stock side channel: the reduced layout.
        units = [0] * len(per_item) if stock is None else [int(n) for n in stock]
        embed = self._embed_features if modality == "image" else self._embed_videos
        return embed(per_item, units, kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The towers' tensors are the pre-processor's (PruMergeEncoder), not the engine's.
        skipped = tuple(p for t in dict.fromkeys(self.towers.values()) for p in tower_prefixes(t))
        kept = ((n, w) for n, w in weights if not n.startswith(skipped))
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=list(self.unused_prefixes))
        return loader.load_weights(kept, mapper=self.hf_to_vllm_mapper)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="multi_modal_projector"
        )
