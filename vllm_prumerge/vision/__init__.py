"""Vision towers: what the reduction needs (features, importance, keys) from CLIP and SigLIP."""

from vllm_prumerge.vision.clip import PruMergeInputs, clip_prumerge_inputs
from vllm_prumerge.vision.towers import (
    ScoringInputs,
    TowerScores,
    num_patches,
    resolve_importance,
    resolve_vision_feature_layer,
    scoring_inputs,
    tower_parts,
    tower_scores,
)

__all__ = [
    "PruMergeInputs",
    "ScoringInputs",
    "TowerScores",
    "clip_prumerge_inputs",
    "num_patches",
    "resolve_importance",
    "resolve_vision_feature_layer",
    "scoring_inputs",
    "tower_parts",
    "tower_scores",
]
