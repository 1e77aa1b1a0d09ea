"""The generated test checkpoint: hub key layout, LLaVA-1.5 geometry, deterministic by seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from vllm_prumerge.testing import TinyLlavaSpec, make_scene, write_tiny_llava


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_checkpoint_uses_the_hub_key_layout(tiny_llava):
    with safe_open(str(Path(tiny_llava) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"vision_tower", "multi_modal_projector", "language_model"}
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if "vision" in k)
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("language_model.model.layers.") for k in keys)


def test_checkpoint_has_llava_1_5_geometry_and_distinct_last_layers(tiny_llava):
    config = json.loads((Path(tiny_llava) / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["image_size"], vision["patch_size"]) == (336, 14)  # 24 x 24 = 576 patches
    assert vision["num_hidden_layers"] >= 2  # "penultimate" and "last" are different layers
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    text = config["text_config"]
    assert (
        text["hidden_size"] // text["num_attention_heads"] == 32
    )  # a head size vLLM's CPU kernels take


def test_tokenizer_processor_and_chat_template_work(tiny_llava):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nHi? ASSISTANT:"
    out = processor(images=[make_scene(0)], text=prompt, return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 336, 336)
    assert out["input_ids"][0].tolist().count(image_id) == 576  # HF expands to the stock count


def test_same_seed_writes_identical_weights_and_another_seed_does_not(tmp_path):
    a = write_tiny_llava(tmp_path / "a", TinyLlavaSpec(seed=3))
    b = write_tiny_llava(tmp_path / "b", TinyLlavaSpec(seed=3))
    c = write_tiny_llava(tmp_path / "c", TinyLlavaSpec(seed=4))
    assert _digest(a) == _digest(b) != _digest(c)


def test_scenes_are_deterministic_and_varied():
    assert make_scene(5).tobytes() == make_scene(5).tobytes()
    assert make_scene(5).tobytes() != make_scene(6).tobytes()
    assert make_scene(1, size=(500, 200)).size == (500, 200)
