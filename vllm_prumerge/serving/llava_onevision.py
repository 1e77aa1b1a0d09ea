"""LLaVA-OneVision images and videos with PruMerge: the LLaVA-NeXT per-crop semantics on a SigLIP
tower, and the same per frame.

Images: each crop (base view first, then the anyres tiles row-major) is reduced on its own with
the tower's importance (received attention: SigLIP has no CLS) and contributes its kept tokens
plus its own extra token; no unpadding, no newline, no ``anyres_max`` downscaling in reduced
modes. ``off`` is stock vLLM LLaVA-OneVision for images (unpadding, ``anyres_max_9``
interpolation, newlines), packed in the engine by vLLM's own merge.

Videos: each frame is reduced exactly as a LLaVA-1.5 image on the tower's full patch grid (its
own importance, IQR fence, PruMerge+ samples, merge, extra token); frames are concatenated in
time order with no 2x2 pooling and no newline, so a video costs ``sum over frames (kept_f + 1)``
tokens (``fixed``: ``frames * (budget + 1)``). ``off`` is stock vLLM token for token: the full
frame features go to the engine, which applies the projector, vLLM's own bilinear 2x2 pooling and
one ``image_newline`` per video (``frames * 196 + 1`` tokens for SigLIP 384/14).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor, PromptReplacement, PromptUpdate

from vllm_prumerge.serving import metrics
from vllm_prumerge.serving.base import FEATURES_KEY, PruMergeImageFeatureInputs
from vllm_prumerge.serving.llava_next import (
    AnyresModelMixin,
    AnyresProcessingInfoMixin,
    AnyresProcessorMixin,
)
from vllm_prumerge.serving.options import CONFIG_KEY, PROFILE_KEY, request_config

# Per video: `[L_v, C]` tower-space features (reduced frames concatenated, or `off`: every
# frame's full patch grid).
VIDEO_FEATURES_KEY = "prumerge_video_features"
# Per video: the frames the engine pools and packs the stock way (`off`), or 0 when the features
# are already the reduced tokens.
STOCK_FRAMES_KEY = "prumerge_stock_frames"


class PruMergeLlavaOnevisionProcessingInfo(AnyresProcessingInfoMixin, LlavaOnevisionProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_max_frame_tokens(self) -> int:
        """A reduced frame's worst case: every patch kept plus its extra token (730 for SigLIP
        384/14, more than the 196 a stock frame costs after pooling)."""
        return self.get_patches_per_crop() + 1

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        # Enough frames that a video keeping every patch fills the whole sequence: any video
        # that fits a prompt is within the bound, whatever its frame count.
        return max(1, math.ceil(seq_len / self.get_max_frame_tokens()))

    def get_max_video_tokens(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        stock = self.get_num_video_tokens(image_width=0, image_height=0, num_frames=frames)
        return max(frames * self.get_max_frame_tokens(), stock)

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {
            "image": self.get_max_image_tokens(),
            "video": self.get_max_video_tokens(seq_len, mm_counts),
        }


class PruMergeLlavaOnevisionDummyInputsBuilder(LlavaOnevisionDummyInputsBuilder):
    pass


class PruMergeLlavaOnevisionMultiModalProcessor(
    AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor
):
    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # vLLM's OneVision processor calls the HF processor itself (for its video path); the
        # generic path goes through our _call_hf_processor, which handles both modalities.
        return BaseMultiModalProcessor._apply_hf_processor_main(self, mm_items, hf_kwargs)

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        hf_data = dict(hf_data)
        videos = hf_data.pop("videos", None) or []
        if not videos:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        images = hf_data.get("images") or []
        if images:  # the HF processor wants one placeholder per image and no video token
            image_token = self.info.get_hf_processor().image_token
            image_data = {"text": image_token * len(images), "images": images}
            processed = super()._call_hf_processor(image_data, hf_kwargs)
        else:
            processed = BatchFeature()
        processed.update(self._reduce_videos(videos, hf_kwargs))
        return processed

    def _reduce_videos(
        self, videos: Sequence[object], hf_kwargs: Mapping[str, object]
    ) -> dict[str, object]:
        """Each video through the HF video processor alone (their frame counts differ), then
        every frame through the tower and the reduction alone."""
        hf_kwargs = dict(hf_kwargs)
        config = request_config(self.info.engine_config, hf_kwargs.pop(CONFIG_KEY, None))
        dtype = self.info.ctx.model_config.dtype
        if hf_kwargs.pop(PROFILE_KEY, False):
            # Start-up profiling: every frame at its worst-case length, no tower.
            width = self.info.get_hf_config().vision_config.hidden_size
            rows = self.info.get_max_frame_tokens()
            return {
                VIDEO_FEATURES_KEY: [
                    torch.zeros((len(v) * rows, width), dtype=dtype) for v in videos
                ],
                STOCK_FRAMES_KEY: torch.zeros(len(videos), dtype=torch.int64),
            }
        processor = self.info.get_hf_processor(**hf_kwargs)
        features, stock_frames, counts, seconds = [], [], [], 0.0
        for video in videos:
            pixel_values = self.info.ctx.call_hf_processor(
                processor, {"text": processor.video_token, "videos": video}, hf_kwargs
            )["pixel_values_videos"][0]  # [T, 3, H, W]
            frames = len(pixel_values)
            if frames == 0:
                raise ValueError("vllm-prumerge: a video needs at least one frame")
            encoded = self.info.encoder.encode(pixel_values, config)  # one row per frame
            seconds += encoded.seconds
            features.append(torch.cat(encoded.features).to(dtype))
            stock_frames.append(0 if config.enabled else frames)
            counts.append(
                len(features[-1])
                if config.enabled
                else self.info.get_num_video_tokens(
                    image_width=0, image_height=0, num_frames=frames
                )
            )
        metrics.record(config.mode, counts, seconds, modality="video")
        return {
            VIDEO_FEATURES_KEY: features,
            STOCK_FRAMES_KEY: torch.tensor(stock_frames, dtype=torch.int64),
        }

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            VIDEO_FEATURES_KEY: MultiModalFieldConfig.batched("video"),
            STOCK_FRAMES_KEY: MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        video_token_id = self.info.get_hf_config().video_token_index

        def get_replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["video"][item_idx]
            frames = int(item[STOCK_FRAMES_KEY].data)
            if frames > 0:  # stock: pooled frames + one newline
                count = self.info.get_num_video_tokens(
                    image_width=0, image_height=0, num_frames=frames
                )
            else:  # the exact reduced count of this video
                count = item[VIDEO_FEATURES_KEY].data.shape[0]
            return [video_token_id] * count

        return [
            *image_updates,
            PromptReplacement(
                modality="video", target=[video_token_id], replacement=get_replacement
            ),
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PruMergeLlavaOnevisionMultiModalProcessor,
    info=PruMergeLlavaOnevisionProcessingInfo,
    dummy_inputs=PruMergeLlavaOnevisionDummyInputsBuilder,
)
class PruMergeLlavaOnevisionForConditionalGeneration(
    AnyresModelMixin, LlavaOnevisionForConditionalGeneration
):
    """LLaVA-OneVision whose image crops and video frames arrive as PruMerge-reduced tower
    features."""

    modalities = frozenset({"image", "video"})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        self._init_without_tower(vllm_config, prefix)

    def _pack_stock(self, image_size: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(
            image_size,
            crops,
            image_newline=self.image_newline,
            vision_aspect_ratio=getattr(self.config, "vision_aspect_ratio", "anyres_max_9"),
            strategy="spatial_unpad",
        )

    def _embed_videos(
        self, features: object, stock_frames: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """Per-video ``[L_v, H]`` LLM embeddings: reduced frames pass through the projector;
        ``off`` frames are projected, pooled 2x2 and closed by one newline, as stock vLLM."""
        inputs = PruMergeImageFeatureInputs(
            data=features, resolve_bindings={"c": self.config.vision_config.hidden_size}
        )
        embeds = self._project(list(inputs["data"]))
        patches = self.get_patches_per_frame()
        for i, frames in enumerate(
            int(n) for n in (stock_frames if stock_frames is not None else [])
        ):
            if frames > 0:
                pooled = self.apply_pooling(embeds[i].view(frames, patches, -1))  # [T, 196, H]
                newline = self.image_newline[None].to(pooled.dtype)
                embeds[i] = torch.cat((pooled.flatten(0, 1), newline))
        return embeds

    def get_patches_per_frame(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor] | torch.Tensor:
        order = list(kwargs)
        video_features = kwargs.pop(VIDEO_FEATURES_KEY, None)
        stock_frames = kwargs.pop(STOCK_FRAMES_KEY, None)
        if video_features is None:
            return super().embed_multimodal(**kwargs)
        videos = self._embed_videos(video_features, stock_frames)
        if not any(k in kwargs for k in (FEATURES_KEY, "image_embeds")):
            return videos
        images = list(super().embed_multimodal(**kwargs))
        # vLLM's order of modalities: the order of their keys (as its OneVision model).
        first_image = min(order.index(k) for k in (FEATURES_KEY, "image_embeds") if k in order)
        if first_image < order.index(VIDEO_FEATURES_KEY):
            return [*images, *videos]
        return [*videos, *images]
