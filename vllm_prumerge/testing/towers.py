"""The production vision towers, by shape: the one place the benchmarks take them from.

CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336: the tower of LLaVA-1.5, LLaVA-NeXT and
LLaVA-NeXT-Video; 24 layers, 1024 wide, 16 heads, MLP 4096, 336 px / patch 14 = 576 patches +
CLS) and SigLIP-so400m/14-384 as llava-hf's SigLIP-LLaVA checkpoints hold it (LLaVA-Interleave,
LLaVA-OneVision: 26 layers, 1152 wide, 16 heads, MLP 4304, 729 patches, no head). Built with
random weights: nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_KEYS += ("image_size", "patch_size")
TOWER_SHAPES: dict[str, dict[str, int]] = {
    "clip-l-336": dict(zip(_KEYS, (1024, 4096, 24, 16, 336, 14), strict=True)),
    "siglip-so400m-384": dict(zip(_KEYS, (1152, 4304, 26, 16, 384, 14), strict=True)),
}
# The layer LLaVA reads its features from (vision_feature_layer) for each tower.
FEATURE_LAYER = {"clip-l-336": -2, "siglip-so400m-384": -1}
# The production tower of each generated family (`TinyLlavaSpec.family`).
FAMILY_TOWERS = {
    "llava": "clip-l-336",
    "llava_next": "clip-l-336",
    "next_video": "clip-l-336",
    "siglip": "siglip-so400m-384",
    "onevision": "siglip-so400m-384",
}


def vision_config(name: str, **overrides: Any) -> Any:
    """transformers' config of tower `name` (a key of TOWER_SHAPES), `overrides` applied (e.g.
    `num_hidden_layers=2` for a shallow copy of the real width)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    shape = {**TOWER_SHAPES[name], **overrides}
    if name.startswith("siglip"):
        return SiglipVisionConfig(**{"vision_use_head": False, **shape})
    return CLIPVisionConfig(**{"projection_dim": 768, "hidden_act": "quick_gelu", **shape})


def build_tower(
    name: str, dtype: Any = None, device: Any = None, attn: str = "sdpa", **overrides: Any
) -> Any:
    """Tower `name` (see `vision_config`) with random weights, `attn` attention (transformers'
    attn_implementation), in eval mode."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    config = vision_config(name, **overrides)
    model = SiglipVisionModel if name.startswith("siglip") else CLIPVisionModel
    tower = model._from_config(config, attn_implementation=attn, dtype=dtype).eval()
    return tower.to(device) if device is not None else tower


def spec_fields(name: str) -> dict[str, int]:
    """Tower `name`'s shape as the vision fields of a `TinyLlavaSpec`."""
    shape = TOWER_SHAPES[name]
    return {
        "vision_hidden_size": shape["hidden_size"],
        "vision_layers": shape["num_hidden_layers"],
        "vision_heads": shape["num_attention_heads"],
        "vision_intermediate_size": shape["intermediate_size"],
    }
