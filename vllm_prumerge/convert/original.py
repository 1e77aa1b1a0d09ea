"""The original LLaVA training format (haotian-liu/LLaVA, 42Shawn/LLaVA-PruMerge) and its keys.

- `config.json` of a LLaVA checkpoint (`model_type` `llava_llama`): the LLaMA fields plus
  `mm_projector_type` (`mlp2x_gelu` for LLaVA-1.5), `mm_hidden_size`, `mm_vision_tower`,
  `mm_vision_select_layer` (-2), `mm_vision_select_feature` (`patch`: CLS dropped),
  `image_aspect_ratio` (`pad`: images padded to a square with the mean colour first),
  `mm_use_im_start_end`, `mm_patch_merge_type`.
- Weights of a full checkpoint: `model.embed_tokens.weight`, `model.layers.N.*`,
  `model.norm.weight`, `lm_head.weight`, `model.mm_projector.{0,2}.{weight,bias}` and, when the
  tower was trained too, `model.vision_tower.vision_tower.vision_model.*`.
- `non_lora_trainables.bin` of a LoRA run: the same names behind PEFT's
  `base_model.model.` prefix; LLaVA's `builder.py` strips it before loading them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_prumerge.convert.weights import ConversionError

# LLaVA-specific config.json fields: everything else is the LLaMA config.
_LLAVA_FIELDS = {
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "image_aspect_ratio",
    "image_crop_resolution",
    "image_grid_pinpoints",
    "image_split_resolution",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
}
# Config fields that describe the file, not the model.
_META_FIELDS = {"_name_or_path", "architectures", "model_type", "transformers_version"}


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing ({what})") from None
    except Exception as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def is_llava_config(config: dict) -> bool:
    return "mm_projector_type" in config or "mm_vision_tower" in config


def text_config_fields(config: dict) -> dict:
    """The LLaMA part of a (LLaVA or plain LLaMA) config.json."""
    return {
        k: v
        for k, v in config.items()
        if not k.startswith("mm_") and k not in _LLAVA_FIELDS and k not in _META_FIELDS
    }


def check_llava15(config: dict, path: Path) -> None:
    """Refuse what a llava-hf LLaVA-1.5 checkpoint cannot express, naming the field."""
    expected = {
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_vision_select_feature": ("patch", None),
        "mm_use_im_start_end": (False, None),
        "mm_patch_merge_type": ("flat", None),
        "image_aspect_ratio": ("pad", "square", None),
    }
    for field, allowed in expected.items():
        value = config.get(field)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None)
            raise ConversionError(
                f"{path}: {field} is {value!r}; a LLaVA-1.5 conversion needs {shown}"
            )
    layer = config.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConversionError(f"{path}: mm_vision_select_layer must be an integer, got {layer!r}")
    model_type = config.get("model_type")
    if model_type not in ("llava_llama", "llava", "llama"):
        raise ConversionError(
            f"{path}: model_type {model_type!r}; only LLaMA-based LLaVA (llava_llama) is supported"
        )


def strip_peft_prefix(key: str) -> str:
    """A `non_lora_trainables.bin` key as LLaVA's builder loads it (`base_model.model.` removed)."""
    if key.startswith("base_model.model."):
        return key[len("base_model.model.") :]
    if key.startswith("base_model."):
        return key[len("base_model.") :]
    return key


_PROJECTOR = re.compile(r"^model\.mm_projector\.(0|2)\.(weight|bias)$")
_TOWER = "model.vision_tower.vision_tower.vision_model."


def hub_key(key: str) -> str | None:
    """The llava-hf key of an original LLaVA key; None for buffers that are not weights.

    Raises KeyError for a key that has no place in a LLaVA-1.5 checkpoint.
    """
    if key.endswith(".rotary_emb.inv_freq") or key.endswith(".position_ids"):
        return None
    match = _PROJECTOR.match(key)
    if match:
        linear = "linear_1" if match[1] == "0" else "linear_2"
        return f"multi_modal_projector.{linear}.{match[2]}"
    if key.startswith(_TOWER):
        return "vision_tower.vision_model." + key[len(_TOWER) :]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")):
        return "language_model." + key
    raise KeyError(key)


def tower_hub_key(key: str) -> str | None:
    """The llava-hf key of an OpenAI CLIP checkpoint key; None for what LLaVA does not use."""
    if key.startswith("vision_model.") and not key.endswith(".position_ids"):
        return "vision_tower." + key
    return None
