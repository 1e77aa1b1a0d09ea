"""The CLIP feature path of the PruMerge reference: patch features and one layer's raw q_cls / K.

A thin view of :func:`vllm_prumerge.vision.towers.scoring_inputs` in the reference's terms, fed
to :func:`vllm_prumerge.reduction.reduce_tokens` (``reduce_tokens(*inputs, config)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vllm_prumerge.vision.towers import scoring_inputs

__all__ = ["PruMergeInputs", "clip_prumerge_inputs"]


class PruMergeInputs(NamedTuple):
    """What the reference reduction needs from a CLIP tower, in the tower's dtype and device.

    Attributes:
        features: ``[B, N, C]`` ``hidden_states[vision_feature_layer]`` without the CLS row (no
            post-layernorm), i.e. LLaVA's ``"default"`` patch features.
        q_cls: ``[B, C]`` the CLS row of the scoring layer's raw ``q_proj`` output.
        keys: ``[B, N + 1, C]`` the scoring layer's raw ``k_proj`` output, CLS row first.
    """

    features: torch.Tensor
    q_cls: torch.Tensor
    keys: torch.Tensor


@torch.no_grad()
def clip_prumerge_inputs(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    vision_feature_layer: int = -2,
) -> PruMergeInputs:
    """Features and scoring q/k from a CLIP tower, exactly as the PruMerge reference.

    Features are ``hidden_states[vision_feature_layer]`` without CLS. The scores come from the
    encoder layer that consumes that hidden state: its ``q_proj`` / ``k_proj`` applied to its
    ``layer_norm1`` of it (raw projections with bias). For ``-1`` (no layer consumes the last
    output) the last layer on its own input; see :mod:`vllm_prumerge.vision.towers`.

    Args:
        vision_model: a transformers ``CLIPVisionModel`` or ``CLIPVisionTransformer``.
        pixel_values: ``[B, 3, H, W]`` preprocessed images (moved to the tower's device/dtype).
        vision_feature_layer: LLaVA's ``vision_feature_layer`` (a single int).

    Returns:
        :class:`PruMergeInputs`: features ``[B, N, C]``, q_cls ``[B, C]``, keys ``[B, N + 1, C]``.
    """
    inputs = scoring_inputs(vision_model, pixel_values, vision_feature_layer, all_queries=False)
    if not inputs.has_cls:
        raise TypeError(
            "clip_prumerge_inputs expects a CLIP tower (with a CLS token); use "
            "vllm_prumerge.vision.tower_scores for CLS-free towers such as SigLIP"
        )
    return PruMergeInputs(features=inputs.features, q_cls=inputs.queries[:, 0], keys=inputs.keys)
