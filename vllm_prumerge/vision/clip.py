"""The CLIP feature path: patch features and one layer's raw q_cls / K, in one partial forward.

No ``output_attentions``, no hooks, no module-level state: we run the tower's own modules
(embeddings, pre-layernorm, encoder layers with whatever attention implementation the model was
built with, e.g. SDPA) up to the layer we need and stop there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["PruMergeInputs", "clip_prumerge_inputs", "resolve_vision_feature_layer"]


class PruMergeInputs(NamedTuple):
    """What the reduction needs from the vision tower, in the tower's dtype and device.

    ``reduce_tokens(*inputs, config)`` unpacks it into
    :func:`vllm_prumerge.reduction.reduce_tokens`.

    Attributes:
        features: ``[B, N, C]`` ``hidden_states[vision_feature_layer]`` without the CLS row (no
            post-layernorm), i.e. LLaVA's ``"default"`` patch features.
        q_cls: ``[B, C]`` the CLS row of the scoring layer's raw ``q_proj`` output.
        keys: ``[B, N + 1, C]`` the scoring layer's raw ``k_proj`` output, CLS row first.
    """

    features: torch.Tensor
    q_cls: torch.Tensor
    keys: torch.Tensor


def _tower_parts(vision_model: nn.Module) -> nn.Module:
    """The module owning ``embeddings``, ``pre_layrnorm`` and ``encoder``.

    transformers' ``CLIPVisionModel`` owns them itself in 5.x and through ``.vision_model``
    (a ``CLIPVisionTransformer``) in 4.x; both are accepted, as is the transformer itself.
    """
    for candidate in (vision_model, getattr(vision_model, "vision_model", None)):
        if candidate is not None and all(
            hasattr(candidate, name) for name in ("embeddings", "pre_layrnorm", "encoder")
        ):
            return candidate
    raise TypeError(
        "clip_prumerge_inputs expects a transformers CLIPVisionModel or CLIPVisionTransformer "
        f"(with embeddings, pre_layrnorm, encoder), got {type(vision_model).__name__}"
    )


def resolve_vision_feature_layer(vision_feature_layer: int, num_layers: int) -> int:
    """The non-negative ``hidden_states`` index of LLaVA's ``vision_feature_layer``.

    ``hidden_states`` has ``num_layers + 1`` entries: index 0 is the (pre-layernormed)
    embedding output and index ``i`` the output of encoder layer ``i - 1``; negative values count
    from the end (``-1`` = last layer's output, ``-2`` = its input, LLaVA-1.5's choice).

    Raises:
        TypeError: for a list of layers (LLaVA-NeXT-style multi-layer features: not supported).
        ValueError: out of range.
    """
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise TypeError(
            "vision_feature_layer must be a single int (multi-layer feature lists are not "
            f"supported by PruMerge), got {vision_feature_layer!r}"
        )
    index = vision_feature_layer
    if index < 0:
        index += num_layers + 1
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"vision_feature_layer {vision_feature_layer} is out of range for a tower with "
            f"{num_layers} layers (hidden_states has {num_layers + 1} entries)"
        )
    return index


def _run_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    output = layer(hidden, None)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def clip_prumerge_inputs(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    vision_feature_layer: int = -2,
) -> PruMergeInputs:
    """Features and scoring q/k from a CLIP tower, exactly as the PruMerge reference.

    Features are ``hidden_states[vision_feature_layer]`` without CLS. The scores come from the
    encoder layer that consumes that hidden state: its ``q_proj`` / ``k_proj`` applied to its
    ``layer_norm1`` of it (raw projections with bias). For LLaVA-1.5's ``-2`` that is the last
    layer, as the reference; the last layer itself is then never run (the features do not need
    it), so this costs one layer less than the stock tower forward.

    ``vision_feature_layer = -1`` (features are the last layer's output; no layer consumes
    them): documented choice: the scores are those of the last layer on its own input
    (``hidden_states[-2]``), i.e. the last attention the tower computes; the features are its
    output. Same for any index equal to ``num_layers``.

    Args:
        vision_model: a transformers ``CLIPVisionModel`` or ``CLIPVisionTransformer``.
        pixel_values: ``[B, 3, H, W]`` preprocessed images (moved to the tower's device/dtype).
        vision_feature_layer: LLaVA's ``vision_feature_layer`` (a single int).

    Returns:
        :class:`PruMergeInputs` in the tower's dtype: features ``[B, N, C]``, q_cls ``[B, C]``,
        keys ``[B, N + 1, C]``.
    """
    tower = _tower_parts(vision_model)
    layers = tower.encoder.layers
    feature_index = resolve_vision_feature_layer(vision_feature_layer, len(layers))
    weight = tower.embeddings.patch_embedding.weight
    pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)

    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    scoring_index = min(feature_index, len(layers) - 1)
    for layer in layers[:scoring_index]:
        hidden = _run_layer(layer, hidden)
    scoring_layer = layers[scoring_index]
    normed = scoring_layer.layer_norm1(hidden)
    q_cls = scoring_layer.self_attn.q_proj(normed[:, 0])
    keys = scoring_layer.self_attn.k_proj(normed)
    if feature_index == len(layers):
        hidden = _run_layer(scoring_layer, hidden)
    return PruMergeInputs(features=hidden[:, 1:], q_cls=q_cls, keys=keys)
