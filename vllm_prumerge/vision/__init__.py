"""Vision towers: what the reduction needs (features, q_cls, keys) from each model family."""

from vllm_prumerge.vision.clip import (
    PruMergeInputs,
    clip_prumerge_inputs,
    resolve_vision_feature_layer,
)

__all__ = ["PruMergeInputs", "clip_prumerge_inputs", "resolve_vision_feature_layer"]
