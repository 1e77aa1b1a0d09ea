"""What the reduction needs from a ViT tower, for CLIP (with CLS) and SigLIP (without).

One partial forward: the tower's own modules (embeddings, CLIP's pre-layernorm, encoder layers
with whatever attention implementation the model was built with, e.g. SDPA) run up to the
scoring layer, whose raw ``q_proj`` / ``k_proj`` outputs on its ``layer_norm1`` input give the
importance scores and the merge keys. No ``output_attentions``, no hooks, no module-level state.

The scoring layer is the encoder layer that consumes ``hidden_states[vision_feature_layer]``
(for LLaVA-1.5's ``-2`` the last layer, as the PruMerge reference), or, when no layer does
(``-1``: the features are the last layer's output, LLaVA-Interleave's setting), the last layer
on its own input, i.e. the last attention the tower computes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vllm_prumerge.reduction import class_attention, received_attention

__all__ = [
    "ScoringInputs",
    "TowerParts",
    "TowerScores",
    "num_patches",
    "resolve_importance",
    "resolve_vision_feature_layer",
    "scoring_inputs",
    "tower_parts",
    "tower_scores",
]


class TowerParts(NamedTuple):
    """The modules of a transformers ViT tower that the partial forward runs."""

    embeddings: nn.Module
    pre_norm: nn.Module | None  # CLIP's pre_layrnorm; SigLIP has none
    layers: nn.ModuleList
    has_cls: bool  # CLIP prepends a CLS token; SigLIP has only patches


def tower_parts(vision_model: nn.Module) -> TowerParts:
    """The parts of a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (or their
    ``*VisionTransformer``), whichever attribute level owns them (transformers 4.x and 5.x)."""
    for candidate in (vision_model, getattr(vision_model, "vision_model", None)):
        if candidate is None or not all(hasattr(candidate, n) for n in ("embeddings", "encoder")):
            continue
        if hasattr(candidate, "pre_layrnorm"):  # CLIP
            return TowerParts(
                candidate.embeddings, candidate.pre_layrnorm, candidate.encoder.layers, True
            )
        if hasattr(candidate.embeddings, "patch_embedding"):  # SigLIP
            return TowerParts(candidate.embeddings, None, candidate.encoder.layers, False)
    raise TypeError(
        "expected a transformers CLIPVisionModel / SiglipVisionModel (or their vision "
        f"transformer, with embeddings and encoder), got {type(vision_model).__name__}"
    )


def num_patches(vision_config) -> int:
    """Patch tokens of one image, crop or frame on the tower's grid, ``(image_size //
    patch_size) ** 2`` (576 for CLIP-L/14-336, 729 for SigLIP 384/14, 256 for CLIP-L/14-224);
    CLIP's CLS token not counted. `vision_config`: a CLIP or SigLIP vision config."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def resolve_vision_feature_layer(vision_feature_layer: int, num_layers: int) -> int:
    """The non-negative ``hidden_states`` index of LLaVA's ``vision_feature_layer``.

    ``hidden_states`` has ``num_layers + 1`` entries: index 0 is the embedding output (after
    CLIP's pre-layernorm) and index ``i`` the output of encoder layer ``i - 1``; negative values
    count from the end (``-1`` = last layer's output, ``-2`` = its input, LLaVA-1.5's choice).

    Raises:
        TypeError: for a list of layers (multi-layer features: not supported).
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


class ScoringInputs(NamedTuple):
    """One partial forward's result, in the tower's dtype and device.

    Attributes:
        features: ``[B, N, C]`` ``hidden_states[vision_feature_layer]`` without the CLS row (no
            post-layernorm): LLaVA's patch features (``"default"`` strategy on CLIP, ``"full"``
            on SigLIP).
        queries: ``[B, Q, D]`` the scoring layer's raw ``q_proj`` output: all ``T`` tokens, or
            only the CLS row (``Q = 1``) when just class attention is needed.
        keys: ``[B, T, D]`` its raw ``k_proj`` output, all tokens (CLS row first on CLIP).
        num_heads: the scoring layer's attention heads.
        has_cls: whether token 0 is a CLS token (``T = N + 1``) or a patch (``T = N``).
    """

    features: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    num_heads: int
    has_cls: bool


@torch.no_grad()
def scoring_inputs(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    vision_feature_layer: int,
    *,
    all_queries: bool = True,
) -> ScoringInputs:
    """Features and the scoring layer's raw q/k in one partial forward (see module docstring).

    When the features are an intermediate hidden state, the layers after the scoring layer are
    never run (for ``-2`` this costs one layer less than the stock forward).

    Args:
        vision_model: a transformers CLIP or SigLIP vision model.
        pixel_values: ``[B, 3, H, W]`` preprocessed images (moved to the tower's device/dtype).
        vision_feature_layer: LLaVA's ``vision_feature_layer`` (a single int).
        all_queries: project every token's query (received attention) or only CLS's.
    """
    parts = tower_parts(vision_model)
    layers = parts.layers
    feature_index = resolve_vision_feature_layer(vision_feature_layer, len(layers))
    weight = parts.embeddings.patch_embedding.weight
    pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)

    hidden = parts.embeddings(pixel_values)
    if parts.pre_norm is not None:
        hidden = parts.pre_norm(hidden)
    scoring_index = min(feature_index, len(layers) - 1)
    for layer in layers[:scoring_index]:
        hidden = _run_layer(layer, hidden)
    scoring_layer = layers[scoring_index]
    attention = scoring_layer.self_attn
    normed = scoring_layer.layer_norm1(hidden)
    queries = attention.q_proj(normed if all_queries or not parts.has_cls else normed[:, :1])
    keys = attention.k_proj(normed)
    if feature_index == len(layers):
        hidden = _run_layer(scoring_layer, hidden)
    features = hidden[:, 1:] if parts.has_cls else hidden
    return ScoringInputs(features, queries, keys, attention.num_heads, parts.has_cls)


class TowerScores(NamedTuple):
    """What :func:`vllm_prumerge.reduction.reduce_by_importance` takes, in that order.

    Attributes:
        features: ``[B, N, C]`` patch features, tower dtype.
        importance: ``[B, N]`` float32 per-patch importance.
        keys: ``[B, N, D]`` the scoring layer's raw patch keys (no CLS row), tower dtype.
    """

    features: torch.Tensor
    importance: torch.Tensor
    keys: torch.Tensor


def resolve_importance(importance: str, has_cls: bool) -> str:
    """``"cls"`` or ``"received"`` for a tower; ValueError for ``"cls"`` without CLS."""
    if importance == "auto":
        return "cls" if has_cls else "received"
    if importance == "cls" and not has_cls:
        raise ValueError(
            "PruMergeConfig.importance 'cls' needs a vision tower with a CLS token; this tower "
            "(e.g. SigLIP) has none: use 'received' (or 'auto')"
        )
    return importance


def tower_scores(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    vision_feature_layer: int,
    importance: str = "auto",
) -> TowerScores:
    """Features, importance and merge keys of a batch of images (or crops) ``[B, 3, H, W]``.

    ``importance`` (see :class:`~vllm_prumerge.config.PruMergeConfig`): ``"cls"`` = the CLS
    row's single-head attention over all channels (the reference); ``"received"`` = the
    attention each patch receives, averaged over heads and all queries (CLS included among
    queries and keys on CLIP, its column dropped); ``"auto"`` = ``"cls"`` if the tower has CLS.
    """
    parts = tower_parts(vision_model)
    kind = resolve_importance(importance, parts.has_cls)
    inputs = scoring_inputs(
        vision_model, pixel_values, vision_feature_layer, all_queries=kind == "received"
    )
    prefix = 1 if inputs.has_cls else 0
    if kind == "cls":
        scores = class_attention(inputs.queries[:, 0], inputs.keys)
    else:
        scores = received_attention(inputs.queries, inputs.keys, inputs.num_heads)[:, prefix:]
    return TowerScores(inputs.features, scores, inputs.keys[:, prefix:])
