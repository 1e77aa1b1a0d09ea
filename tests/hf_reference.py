"""An independent LLaVA-family + PruMerge pipeline in plain transformers, for checking vLLM.

Nothing here goes through the plugin's serving code, its encoder or its tower path: the tower
runs as transformers' full forward (eager attention); the scoring layer's q/k are read with
forward hooks (CLIP: the CLS row's class attention, by the core ``reduce_tokens``), or its
attention probabilities are read from ``output_attentions`` (SigLIP, and CLIP with
``importance="received"``: averaged over heads and queries by hand here, CLIP's CLS column
dropped); the core reduction (``reduce_tokens`` / ``reduce_by_importance``) is
applied per image or per LLaVA-NeXT crop (crops counted by transformers' own anyres helper);
``off`` on LLaVA-NeXT / OneVision uses transformers' own ``get_image_features``, which packs
(unpadding, OneVision's ``anyres_max`` downscaling, newlines); the projected features are
spliced into ``inputs_embeds``, and decoding is an explicit greedy loop over raw logits.

Not independent of the plugin: the selection and merge are the plugin's own core reduction
(``vllm_prumerge.reduction``), pinned separately against the naive loop transcription of the
reference in tests/test_reduction_reference.py and tests/test_received_attention.py. What a
comparison with this pipeline checks is everything around that core in vLLM: tower, scores,
crops, packing, placeholder counts, projector and the language model.

Videos (LLaVA-OneVision, LLaVA-NeXT-Video): transformers' own video processor gives the
frames; each frame is reduced by the same per-row path as an image (tower via hooks, then the core
reduction), the frames' projected tokens are concatenated in time order (with ``temporal``:
the retained patches by :func:`reference_retention`, vLLM's own EVS function or a plain
float64 loop, then each frame's retained patches through the core); ``off`` uses
transformers' own ``get_video_features`` (OneVision: projector, 2x2 bilinear pooling, one
newline; NeXT-Video: 2x2 average pooling, then projector). This reuses the plugin's reduction
core (``reduce_tokens`` / ``reduce_by_importance``), which tests/test_reduction_reference.py pins
separately against the naive reference.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import class_attention, reduce_by_importance, reduce_tokens


def reference_retention(features: torch.Tensor, config: PruMergeConfig) -> torch.Tensor:
    """``[T, N]`` bool: the patches a video's temporal stage retains, by paths independent of the
    plugin's (:mod:`vllm_prumerge.reduction.temporal`): ``evs`` is vLLM's own
    ``compute_retention_mask`` (spatial merge 1 on the ``[T, N, C]`` patch features, float32);
    ``adaptive`` a plain loop over frames in float64, ``x . a / (|x| |a|)`` to each position's
    anchor (the last frame that kept it), dropped at ``>= temporal_threshold``."""
    frames, patches, width = features.shape
    if config.temporal == "evs":
        from vllm.multimodal.video_prune.evs import compute_retention_mask

        side = round(patches**0.5)
        assert side * side == patches, patches
        flat = features.float().reshape(frames * patches, width)
        mask = compute_retention_mask(flat, (frames, side, side), 1, config.temporal_rate)
        return mask.view(frames, patches)
    assert config.temporal == "adaptive", config.temporal
    x = features.double()
    retained = torch.ones(frames, patches, dtype=torch.bool)
    anchor = x[0].clone()
    for t in range(1, frames):
        dots = (x[t] * anchor).sum(-1)
        cosine = dots / (x[t].norm(dim=-1) * anchor.norm(dim=-1))
        kept = ~(cosine >= config.temporal_threshold)
        retained[t] = kept
        anchor[kept] = x[t][kept]
    return retained


def retention_margin(features: torch.Tensor, config: PruMergeConfig) -> float:
    """How far a video's temporal decisions are from their boundary: ``adaptive``, the smallest
    ``|cosine - threshold|`` of any patch against its anchor; ``evs``, the gap between the last
    kept and the first dropped dissimilarity. Two towers that differ by float rounding (~1e-6)
    take the same decisions when this is well above it."""
    x = features.double()
    if config.temporal == "adaptive":
        margin, anchor = math.inf, x[0].clone()
        for t in range(1, x.shape[0]):
            cosine = (x[t] * anchor).sum(-1) / (x[t].norm(dim=-1) * anchor.norm(dim=-1))
            margin = min(margin, float((cosine - config.temporal_threshold).abs().min()))
            kept = ~(cosine >= config.temporal_threshold)
            anchor[kept] = x[t][kept]
        return margin
    frames, patches, _ = x.shape
    if frames == 1:
        return math.inf
    later = (1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)).flatten()
    keep = max(patches, int(patches * frames * (1 - config.temporal_rate))) - patches
    ranked = later.sort(descending=True).values
    if keep == 0 or keep >= len(ranked):
        return math.inf
    return float(ranked[keep - 1] - ranked[keep])


def reduce_video_reference(
    features: torch.Tensor, importance: torch.Tensor, keys: torch.Tensor, config: PruMergeConfig
) -> torch.Tensor:
    """``[L, C]``: a video's frames with the temporal stage: :func:`reference_retention`, then
    each frame's retained patches gathered and reduced by the core as if they were the whole
    frame (no token for a frame that retained none), frames in time order."""
    retained = reference_retention(features, config)
    rows = []
    for t in range(features.shape[0]):
        index = retained[t].nonzero()[:, 0]
        if len(index):
            part = (
                features[t : t + 1, index],
                importance[t : t + 1, index],
                keys[t : t + 1, index],
            )
            rows.append(reduce_by_importance(*part, config).features)
    return torch.cat(rows) if rows else features.new_zeros((0, features.shape[-1]))


class HFPruMergeLlava:
    """LLaVA-1.5, SigLIP-LLaVA (LLaVA-Interleave-shaped), LLaVA-NeXT and LLaVA-OneVision (images),
    by the checkpoint."""

    def __init__(self, checkpoint: str) -> None:
        self.model = AutoModelForImageTextToText.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.config = self.model.config
        self.image_token = self.config.image_token_index
        self.video_token = getattr(self.config, "video_token_index", None)
        self.is_next = hasattr(self.config, "image_grid_pinpoints")
        self.has_cls = isinstance(self.config.vision_config, CLIPVisionConfig)

    def _tower(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def _scoring_layer_index(self) -> int:
        # hidden_states[i] is the input of encoder layer i; for -1 no layer consumes the output,
        # so the last layer (on its own input) scores.
        n = len(self._tower().encoder.layers)
        index = self.config.vision_feature_layer % (n + 1)
        return min(index, n - 1)

    @torch.no_grad()
    def _reduce_crops(
        self, pixel_values: torch.Tensor, config: PruMergeConfig, video: bool = False
    ) -> torch.Tensor:
        """`[L, C]`: every row of `[K, 3, H, W]` reduced on its own, concatenated; a `video`'s
        frames with `config.temporal` go through :func:`reduce_video_reference` instead."""
        tower = self._tower()
        layer = tower.encoder.layers[self._scoring_layer_index()]
        captured = {}
        hooks = [
            layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.update(q=o)),
            layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.update(k=o)),
        ]
        by_cls = self.has_cls and config.importance != "received"
        try:
            out = tower(pixel_values, output_hidden_states=True, output_attentions=not by_cls)
        finally:
            for h in hooks:
                h.remove()
        hidden = out.hidden_states[self.config.vision_feature_layer]
        if video and config.enabled and config.temporal != "off":
            if by_cls:
                importance = class_attention(captured["q"][:, 0], captured["k"])
            else:
                probs = out.attentions[self._scoring_layer_index()]
                received = probs.float().mean(dim=1).mean(dim=1)
                importance = received[:, 1:] if self.has_cls else received
            prefix = 1 if self.has_cls else 0
            return reduce_video_reference(
                hidden[:, prefix:], importance, captured["k"][:, prefix:], config
            )
        if by_cls:
            reduced = reduce_tokens(hidden[:, 1:], captured["q"][:, 0], captured["k"], config)
        else:
            probs = out.attentions[self._scoring_layer_index()]  # [K, H, T, T] softmax rows
            received = probs.float().mean(dim=1).mean(dim=1)  # over heads, then queries
            prefix = 1 if self.has_cls else 0  # CLIP: the CLS query counts, its column goes
            reduced = reduce_by_importance(
                hidden[:, prefix:], received[:, prefix:], captured["k"][:, prefix:], config
            )
        return reduced.features

    def _crops(self, image):
        processed = self.processor.image_processor([image], return_tensors="pt")
        pixel_values = processed["pixel_values"]
        if not self.is_next:
            return pixel_values, None
        height, width = (int(v) for v in processed["image_sizes"][0])
        rows, cols = get_anyres_image_grid_shape(
            (height, width),
            self.config.image_grid_pinpoints,
            self.config.vision_config.image_size,
        )
        return pixel_values[0, : 1 + rows * cols], processed["image_sizes"]

    def num_crops(self, image) -> int:
        """Views the tower sees for one PIL image: 1, or LLaVA-NeXT's base view + grid tiles (the
        grid by transformers' own anyres helper)."""
        return len(self._crops(image)[0])

    def stock_image_tokens(self, image) -> int:
        """Visual tokens of one PIL image without reduction, as transformers' own processor
        expands `<image>` (LLaVA-NeXT / OneVision: base view + unpadded tiles + newlines)."""
        ids = self.processor(images=[image], text="<image>", return_tensors="pt").input_ids[0]
        return int((ids == self.image_token).sum())

    @torch.no_grad()
    def image_features(self, image, config: PruMergeConfig) -> torch.Tensor:
        """`[L, C]` reduced tower-space features of one PIL image (crops concatenated)."""
        return self._reduce_crops(self._crops(image)[0], config)

    @torch.no_grad()
    def image_embeds(self, image, config: PruMergeConfig) -> torch.Tensor:
        """`[L, H]` what the LLM receives for one PIL image."""
        crops, image_sizes = self._crops(image)
        if self.is_next and not config.enabled:  # transformers' own anyres packing
            packed = self.model.model.get_image_features(crops[None], image_sizes).pooler_output
            if isinstance(packed, (list, tuple)):  # one [L, H] per image (one image here)
                packed = torch.cat(list(packed))
            return packed
        return self.model.model.multi_modal_projector(self._reduce_crops(crops, config))

    @torch.no_grad()
    def frame_features(self, frames: torch.Tensor, config: PruMergeConfig) -> torch.Tensor:
        """`[L, C]`: video frames `[T, 3, H, W]` through the tower, each reduced on its own
        (with `config.temporal`: on the patches it retained)."""
        return self._reduce_crops(frames, config, video=True)

    def crop_counts(self, image, config: PruMergeConfig) -> list[int]:
        """Tokens of each crop (one view: one crop) of one PIL image, each reduced alone."""
        return [len(self._reduce_crops(crop[None], config)) for crop in self._crops(image)[0]]

    def frame_counts(self, video, config: PruMergeConfig) -> list[int]:
        """Tokens of each frame of one video, each reduced alone (no temporal stage)."""
        return [len(self.frame_features(f[None], config)) for f in self.video_frames(video)]

    @torch.no_grad()
    def video_patch_features(self, video) -> torch.Tensor:
        """`[T, N, C]`: the tower's patch features (``hidden_states[vision_feature_layer]``, CLS
        row dropped) of one `[T, H, W, 3]` uint8 video's frames: what the temporal stage
        compares."""
        out = self._tower()(self.video_frames(video), output_hidden_states=True)
        hidden = out.hidden_states[self.config.vision_feature_layer]
        return hidden[:, 1:] if self.has_cls else hidden

    def video_frames(self, video) -> torch.Tensor:
        """`[T, 3, H, W]`: transformers' video processor on one `[T, H, W, 3]` uint8 video."""
        processed = self.processor.video_processor(videos=[video], return_tensors="pt")
        return processed["pixel_values_videos"][0]

    @torch.no_grad()
    def video_embeds(self, video, config: PruMergeConfig) -> torch.Tensor:
        """`[L, H]` what the LLM receives for one video: reduced frames in time order, or
        (``off``) transformers' own pooled frames plus one newline."""
        frames = self.video_frames(video)
        if not config.enabled:
            packed = self.model.model.get_video_features(
                frames[None],
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            ).pooler_output[0]  # OneVision: [L, H]; NeXT-Video: [T, 144, H]
            return packed.reshape(-1, packed.shape[-1])
        return self.model.model.multi_modal_projector(self.frame_features(frames, config))

    @torch.no_grad()
    def generate(self, prompt: str, images, configs, max_new_tokens: int, videos=()):
        """Greedy decoding: (token ids, their log-probabilities, visual tokens per image or
        video in prompt order). `videos` are `(video, config)` pairs for `<video>` tokens."""
        ids = self.processor.tokenizer(prompt).input_ids
        embeds = [self.image_embeds(i, c) for i, c in zip(images, configs, strict=True)]
        video_embeds = iter([self.video_embeds(v, c) for v, c in videos])
        embed = self.model.get_input_embeddings()
        pieces, counts, it = [], [], iter(embeds)
        for tok in ids:
            if tok == self.video_token:
                e = next(video_embeds)
                pieces.append(e)
                counts.append(e.shape[0])
            elif tok == self.image_token:
                e = next(it)
                pieces.append(e)
                counts.append(e.shape[0])
            else:
                pieces.append(embed(torch.tensor([tok])))
        inputs_embeds = torch.cat(pieces)[None]
        lm = self.model
        out = lm(inputs_embeds=inputs_embeds, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            lp = torch.log_softmax(logits.float(), dim=-1)
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            out = lm(
                inputs_embeds=embed(torch.tensor([[tok]])), past_key_values=past, use_cache=True
            )
            past, logits = out.past_key_values, out.logits[0, -1]
        return tokens, logprobs, counts


class HFPruMergeVideoLlava(HFPruMergeLlava):
    """Video-LLaVA (``VideoLlavaForConditionalGeneration``): images through transformers'
    ``image_tower``, video frames through its ``video_tower``, each row reduced by the same
    per-row path as above (hooks on the tower, then the core reduction); ``off`` is
    transformers' own ``get_image_features`` (256 patch tokens, CLS dropped) and
    ``get_video_features`` (every frame's 257 tokens, CLS kept), projected."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(checkpoint)
        self._active = self.model.model.image_tower

    def _tower(self):
        return getattr(self._active, "vision_model", self._active)

    @contextlib.contextmanager
    def _using(self, tower):
        previous, self._active = self._active, tower
        try:
            yield
        finally:
            self._active = previous

    def _crops(self, image):
        # A PIL image is channels-last; stated, since this (numpy) image processor otherwise
        # guesses the channel axis from the shape, wrongly for a 1x1 image.
        processed = self.processor.image_processor(
            [image], input_data_format="channels_last", return_tensors="pt"
        )
        return processed["pixel_values_images"], None

    @torch.no_grad()
    def frame_features(self, frames: torch.Tensor, config: PruMergeConfig) -> torch.Tensor:
        """`[L, C]`: the video tower's frames `[T, 3, H, W]`, each reduced on its own (with
        `config.temporal`: on the patches it retained)."""
        with self._using(self.model.model.video_tower):
            return self._reduce_crops(frames, config, video=True)

    @torch.no_grad()
    def video_patch_features(self, video) -> torch.Tensor:
        with self._using(self.model.model.video_tower):
            return super().video_patch_features(video)

    @torch.no_grad()
    def image_embeds(self, image, config: PruMergeConfig) -> torch.Tensor:
        pixel_values = self._crops(image)[0]
        if not config.enabled:
            return self.model.model.get_image_features(
                pixel_values,
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            ).pooler_output[0]
        with self._using(self.model.model.image_tower):
            return self.model.model.multi_modal_projector(self._reduce_crops(pixel_values, config))

    @torch.no_grad()
    def video_embeds(self, video, config: PruMergeConfig) -> torch.Tensor:
        frames = self.video_frames(video)
        if not config.enabled:
            packed = self.model.model.get_video_features(
                frames[None], vision_feature_layer=self.config.vision_feature_layer
            ).pooler_output  # [T, 257, H]
            return packed.reshape(-1, packed.shape[-1])
        return self.model.model.multi_modal_projector(self.frame_features(frames, config))


def reference_for(checkpoint: str) -> HFPruMergeLlava:
    """The transformers pipeline of the checkpoint's family."""
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(checkpoint).model_type == "video_llava":
        return HFPruMergeVideoLlava(checkpoint)
    return HFPruMergeLlava(checkpoint)


class TransformersStock:
    """transformers' own model end to end in the place of a stock vLLM engine, for the family
    vLLM 0.32 cannot serve (Video-LLaVA): `generate(prompts, sampling)` takes vLLM's offline
    prompt dicts and greedy `SamplingParams` and answers with what the tests read of vLLM's
    `RequestOutput`s (the expanded prompt ids, the greedy tokens and their log-probabilities),
    by transformers' processor (prompt expansion) and `generate`."""

    def __init__(self, reference: HFPruMergeLlava) -> None:
        self.reference = reference

    @torch.no_grad()
    def generate(self, prompts, sampling):
        from types import SimpleNamespace

        outputs = []
        for prompt in prompts:
            data = prompt["multi_modal_data"]
            images, videos = data.get("image"), data.get("video")
            images = [images] if images is not None and not isinstance(images, list) else images
            videos = [videos] if videos is not None and not isinstance(videos, list) else videos
            inputs = self.reference.processor(
                text=prompt["prompt"], images=images, videos=videos, return_tensors="pt"
            )
            n = sampling.max_tokens
            generated = self.reference.model.generate(
                **inputs,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            ids = inputs["input_ids"][0].tolist()
            tokens = generated.sequences[0, len(ids) :].tolist()
            logprobs = [
                {t: SimpleNamespace(logprob=float(torch.log_softmax(step[0].float(), -1)[t]))}
                for t, step in zip(tokens, generated.logits, strict=True)
            ]
            completion = SimpleNamespace(token_ids=tokens, logprobs=logprobs)
            outputs.append(SimpleNamespace(prompt_token_ids=ids, outputs=[completion]))
        return outputs
