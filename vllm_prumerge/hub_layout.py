"""The llava-hf checkpoint key layout: the one home of its prefixes.

Hub checkpoints (llava-hf/llava-1.5-7b-hf and the other families' llava-hf ids), and vLLM
0.32's loader, name the parts `vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*` and (LLaVA-NeXT, OneVision)
`image_newline` (Video-LLaVA, LanguageBind/Video-LLaVA-7B-hf: two towers instead,
`image_tower.vision_model.*` and `video_tower.vision_model.*`); transformers 5.x's
`state_dict()` names them `model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.*`, `model.image_newline` (`model.image_tower.*`, ...).
The converter and the generated test checkpoints write the hub layout; the encoder reads the
tower from either.
"""

from __future__ import annotations

from types import MappingProxyType

# transformers-5 prefix -> hub prefix, most specific first (a key takes the first that matches).
HUB_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.image_newline", "image_newline"),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.image_tower.vision_model.", "image_tower.vision_model."),
    ("model.image_tower.", "image_tower.vision_model."),
    ("model.video_tower.vision_model.", "video_tower.vision_model."),
    ("model.video_tower.", "video_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)

# The tower of every family but Video-LLaVA, whose towers are `image_tower` and `video_tower`.
VISION_TOWER = "vision_tower"
# The checkpoint's tower of each modality: one tower for images and video frames (every family
# but Video-LLaVA, whose family file maps each modality to its own tower).
SHARED_TOWER = MappingProxyType({"image": VISION_TOWER, "video": VISION_TOWER})


def tower_prefixes(tower: str = VISION_TOWER) -> tuple[str, ...]:
    """Prefixes of a tower's keys, most specific first: the hub layout and the layouts
    transformers 4.52+ and 5.x write."""
    return (
        f"model.{tower}.vision_model.",
        f"{tower}.vision_model.",
        f"model.{tower}.",
        f"{tower}.",
    )


TOWER_PREFIXES: tuple[str, ...] = tower_prefixes()


def hub_key(key: str) -> str:
    """A transformers-5 LLaVA-family state-dict key in the hub layout; ValueError for a key of
    none of its parts."""
    for new, old in HUB_RENAMES:
        if key.startswith(new):
            return old + key[len(new) :]
    raise ValueError(f"unexpected LLaVA state-dict key {key!r}")


def strip_tower_prefix(key: str, tower: str = VISION_TOWER) -> str | None:
    """The tower's own name of a checkpoint key (`embeddings...`, `encoder...`), or None for a
    key outside that tower (`tower`: `vision_tower`, or Video-LLaVA's `image_tower` /
    `video_tower`)."""
    for prefix in tower_prefixes(tower):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None
