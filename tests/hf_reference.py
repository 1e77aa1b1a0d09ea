"""An independent LLaVA + PruMerge pipeline in plain transformers, for checking what vLLM serves.

Nothing here goes through the plugin's serving code or its CLIP path: the tower runs as
transformers' full forward (eager attention), the scoring layer's q/k are read with forward hooks,
the core reduction is applied to those, the projected features are spliced into
`inputs_embeds`, and decoding is an explicit greedy loop over raw logits.
"""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import reduce_tokens


class HFPruMergeLlava:
    def __init__(self, checkpoint: str) -> None:
        self.model = LlavaForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.config = self.model.config
        self.image_token = self.config.image_token_index

    def _tower(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    @torch.no_grad()
    def image_features(self, image, config: PruMergeConfig) -> torch.Tensor:
        """`[L, C]` reduced CLIP-space features of one PIL image."""
        pixel_values = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        tower = self._tower()
        # hidden_states[i] is the input of encoder layer i: for -2 the scoring layer is the last.
        layers = tower.encoder.layers
        layer = layers[self.config.vision_feature_layer + len(layers) + 1]
        captured = {}
        hooks = [
            layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.update(q=o)),
            layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.update(k=o)),
        ]
        try:
            out = tower(pixel_values, output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        features = out.hidden_states[self.config.vision_feature_layer][:, 1:]
        return reduce_tokens(features, captured["q"][:, 0], captured["k"], config).split()[0]

    @torch.no_grad()
    def generate(self, prompt: str, images, configs, max_new_tokens: int):
        """Greedy decoding: (token ids, their log-probabilities, visual tokens per image)."""
        ids = self.processor.tokenizer(prompt).input_ids
        feats = [self.image_features(img, cfg) for img, cfg in zip(images, configs, strict=True)]
        embed = self.model.get_input_embeddings()
        pieces, counts, it = [], [], iter(feats)
        for tok in ids:
            if tok == self.image_token:
                f = next(it)
                pieces.append(self.model.model.multi_modal_projector(f))
                counts.append(f.shape[0])
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
