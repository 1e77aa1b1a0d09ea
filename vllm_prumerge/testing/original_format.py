"""Tiny stand-ins, in the exact original formats, of what `vllm-prumerge convert` reads.

The authors' PruMerge checkpoints are LLaVA training outputs on top of Vicuna and OpenAI's CLIP.
This module writes miniature versions of each piece, byte-for-byte in the same formats and key
names, so the converter can be tested without downloading anything:

- a base Llama folder like `lmsys/vicuna-7b-v1.5`: `config.json`, sharded weights with an index
  (safetensors or pickled `.bin`, float16), and a SentencePiece `tokenizer.model` trained here
  with Llama's settings (BPE, byte fallback, digits split, dummy prefix, `<unk>`/`<s>`/`</s>`
  at 0/1/2) plus `tokenizer_config.json` (`LlamaTokenizer`);
- a CLIP folder like `openai/clip-vit-large-patch14-336`: a full `CLIPModel` (text and vision) as
  pickled `pytorch_model.bin` with the old `position_ids` buffers, the legacy
  `preprocessor_config.json` (`CLIPFeatureExtractor`, integer `size`/`crop_size`); the vision
  tower has the real geometry (336 px, patch 14: 576 patches + CLS) at a tiny width;
- a LoRA folder like `yuzhang/llava-prumerge-vicuna-7b-v1.5-lora` (what LLaVA's `train.py`
  saves with `--lora_enable`): PEFT `adapter_config.json`, `adapter_model.bin` (or
  `.safetensors`) with keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
  ([r, in]) / `...lora_B.weight` ([out, r]), `non_lora_trainables.bin` with the mlp2x_gelu
  projector (`base_model.model.model.mm_projector.{0,2}.{weight,bias}`) and the LLaVA
  `config.json` (`llava_llama`, `mm_*` fields);
- a full (merged, no LoRA) original LLaVA folder like `liuhaotian/llava-v1.5-7b`: keys
  `model.*`, `lm_head.weight`, `model.mm_projector.*` in sharded `.bin` files with an index.

    python -m vllm_prumerge.testing.original_format OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

# Text for the SentencePiece model's merges; the tokenizer is part of the stand-in's identity.
_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is shown in this image? ASSISTANT: The image shows a red square.",
    "USER: How many objects are there? ASSISTANT: There are three objects.",
    "What colour is the circle? Is there any text in the image? Describe the picture in detail.",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "Answer the question using a single word or phrase. Yes No one two three four five",
    "the of and a to in is that it with as for was on are be this by at from 0 1 2 3 4 5 6 7 8 9",
]

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass(frozen=True)
class OriginalFormatSpec:
    """Shapes and formats of the stand-ins. Defaults: a few MB in all, written in seconds."""

    seed: int = 0
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4  # head_dim 32: vLLM's CPU attention rejects e.g. 24
    text_intermediate_size: int = 256
    tokenizer_vocab_size: int = 384  # SentencePiece pieces = the base's embedding rows
    vision_hidden_size: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    # Class attention peaked like a trained CLIP's instead of a random init's near-uniform one.
    attention_sharpness: float = 4.0
    base_format: str = "safetensors"  # "safetensors" or "bin" (sharded, with an index)
    base_dtype: str = "float16"
    lora_r: int = 8
    lora_alpha: int = 16
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] = LLAMA_LINEAR_MODULES
    adapter_format: str = "bin"  # "bin" (as LLaVA's trainer saved it) or "safetensors"
    lora_dtype: str = "bfloat16"  # LLaVA trains LoRA with --bf16
    # Std of the "trained" lora_B (PEFT initialises it to 0; a trained adapter is not 0).
    lora_b_std: float = 0.05
    image_aspect_ratio: str = "pad"  # LLaVA-1.5's setting

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class OriginalFormatFolders:
    """Where `write_original_format` put each stand-in."""

    base: Path  # base Llama (Vicuna-like) HF folder
    vision: Path  # OpenAI CLIP HF folder
    lora: Path  # LLaVA LoRA training output (adapter + non_lora_trainables + config)
    full: Path  # full original-format LLaVA (no LoRA)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _train_sentencepiece(spec: OriginalFormatSpec) -> bytes:
    """A SentencePiece model trained with the options of Llama's tokenizer.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 8),
        model_writer=buf,
        model_type="bpe",
        vocab_size=spec.tokenizer_vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _save_sharded(state: dict, out: Path, fmt: str, prefix: str, shards: int = 2) -> None:
    """Write `state` as `shards` files plus an index, in HF's names for `fmt`."""
    import torch
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // shards)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        if fmt == "safetensors":
            save_file(part, str(out / name), metadata={"format": "pt"})
        else:
            torch.save(part, out / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = (
        f"{prefix}.safetensors.index.json" if fmt == "safetensors" else f"{prefix}.bin.index.json"
    )
    (out / index).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _llama_config(spec: OriginalFormatSpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.tokenizer_vocab_size,
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _config_dict(config, dtype: str, architectures: list[str]) -> dict:
    data = config.to_dict()
    data.pop("transformers_version", None)
    data.pop("dtype", None)
    data["torch_dtype"] = dtype  # the key the 2023 checkpoints carry
    data["architectures"] = architectures
    return data


def write_base_llama(out: Path, spec: OriginalFormatSpec) -> dict:
    """A Vicuna-like base folder; returns its float32 state dict (original key names)."""
    import torch
    from transformers import LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = _llama_config(spec)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    dtype = _torch_dtype(spec.base_dtype)
    _save_sharded({k: v.to(dtype) for k, v in state.items()}, out, spec.base_format, "model")
    _write_json(out / "config.json", _config_dict(config, spec.base_dtype, ["LlamaForCausalLM"]))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096},
    )
    (out / "tokenizer.model").write_bytes(_train_sentencepiece(spec))
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 4096,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )
    return state


def write_clip_tower(out: Path, spec: OriginalFormatSpec) -> dict:
    """An OpenAI-CLIP-like folder (full CLIPModel, pickled); returns its state dict."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "vocab_size": 99,
            "hidden_act": "quick_gelu",
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "hidden_act": "quick_gelu",
        },
        projection_dim=32,
    )
    torch.manual_seed(spec.seed + 1)
    model = CLIPModel(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().float()
        if key.startswith("vision_model.") and key.endswith((".q_proj.weight", ".k_proj.weight")):
            value = value * spec.attention_sharpness
        state[key] = value.contiguous()
    # Checkpoints saved by 2022 transformers carry these buffers; converters must skip them.
    num_positions = (336 // 14) ** 2 + 1
    state["vision_model.embeddings.position_ids"] = torch.arange(num_positions)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, out / "pytorch_model.bin")
    _write_json(out / "config.json", _config_dict(config, "float32", ["CLIPModel"]))
    _write_json(
        out / "preprocessor_config.json",
        {
            "crop_size": 336,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
            "resample": 3,
            "size": 336,
        },
    )
    return state


def _llava_config(spec: OriginalFormatSpec, vision_name: str) -> dict:
    """The `config.json` LLaVA's trainer writes next to its LoRA or full checkpoints."""
    data = _config_dict(_llama_config(spec), spec.lora_dtype, ["LlavaLlamaForCausalLM"])
    data.update(
        {
            "model_type": "llava_llama",
            "freeze_mm_mlp_adapter": False,
            "image_aspect_ratio": spec.image_aspect_ratio,
            "mm_hidden_size": spec.vision_hidden_size,
            "mm_patch_merge_type": "flat",
            "mm_projector_lr": 2e-05,
            "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": vision_name,
            "tokenizer_model_max_length": 2048,
            "tokenizer_padding_side": "right",
            "tune_mm_mlp_adapter": False,
            "use_cache": True,
            "use_mm_proj": True,
        }
    )
    return data


def _projector(spec: OriginalFormatSpec) -> dict:
    import torch

    torch.manual_seed(spec.seed + 2)
    first = torch.nn.Linear(spec.vision_hidden_size, spec.text_hidden_size)
    second = torch.nn.Linear(spec.text_hidden_size, spec.text_hidden_size)
    return {
        "0.weight": first.weight.detach(),
        "0.bias": first.bias.detach(),
        "2.weight": second.weight.detach(),
        "2.bias": second.bias.detach(),
    }


def write_lora_adapter(
    out: Path, spec: OriginalFormatSpec, base_state: dict, base_name: str, vision_name: str
) -> None:
    """A LLaVA `--lora_enable` training output for the base whose state dict is given."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    dtype = _torch_dtype(spec.lora_dtype)
    torch.manual_seed(spec.seed + 3)
    adapter = {}
    for key, weight in base_state.items():
        parts = key.split(".")
        if not (key.startswith("model.layers.") and parts[-2] in spec.target_modules):
            continue
        # [out, in] whatever fan_in_fan_out says: PEFT resets the flag for nn.Linear targets.
        out_features, in_features = weight.shape
        module = key[: -len(".weight")]
        a = torch.randn(spec.lora_r, in_features) / in_features**0.5
        b = torch.randn(out_features, spec.lora_r) * spec.lora_b_std
        adapter[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        adapter[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()
    if spec.adapter_format == "safetensors":
        save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(adapter, out / "adapter_model.bin")
    _write_json(
        out / "adapter_config.json",
        {
            "alpha_pattern": {},
            "auto_mapping": None,
            "base_model_name_or_path": base_name,
            "bias": "none",
            "fan_in_fan_out": spec.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": spec.lora_alpha,
            "lora_dropout": 0.05,
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": spec.lora_r,
            "rank_pattern": {},
            "revision": None,
            "target_modules": list(spec.target_modules),
            "task_type": "CAUSAL_LM",
            "use_rslora": spec.use_rslora,
        },
    )
    projector = {
        f"base_model.model.model.mm_projector.{k}": v.to(dtype).contiguous()
        for k, v in _projector(spec).items()
    }
    torch.save(projector, out / "non_lora_trainables.bin")
    _write_json(out / "config.json", _llava_config(spec, vision_name))


def write_full_original(
    out: Path, spec: OriginalFormatSpec, base_state: dict, base_dir: Path, vision_name: str
) -> None:
    """A full original-format LLaVA (`liuhaotian/llava-v1.5-7b` layout), sharded `.bin`."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed + 4)
    # Distinct from the base (a fine-tuned model), so a converter that read the base would fail.
    state = {k: (v + 0.01 * torch.randn_like(v)).to(torch.float16) for k, v in base_state.items()}
    for k, v in _projector(spec).items():
        state[f"model.mm_projector.{k}"] = v.to(torch.float16)
    _save_sharded(state, out, "bin", "pytorch_model")
    config = _llava_config(spec, vision_name)
    config["torch_dtype"] = "float16"
    _write_json(out / "config.json", config)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base_dir / name, out / name)
    _write_json(
        out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    )


def write_original_format(
    out_dir: str | os.PathLike, spec: OriginalFormatSpec | None = None
) -> OriginalFormatFolders:
    """Write all four stand-ins under `out_dir` (created); deterministic for a given spec."""
    spec = spec or OriginalFormatSpec()
    root = Path(out_dir)
    folders = OriginalFormatFolders(
        base=root / "vicuna", vision=root / "clip", lora=root / "lora", full=root / "llava-full"
    )
    base_state = write_base_llama(folders.base, spec)
    write_clip_tower(folders.vision, spec)
    vision_id = "openai/clip-vit-large-patch14-336"  # as the real configs say
    write_lora_adapter(folders.lora, spec, base_state, "lmsys/vicuna-7b-v1.5", vision_id)
    write_full_original(folders.full, spec, base_state, folders.base, vision_id)
    return folders


def cached_original_format(
    spec: OriginalFormatSpec | None = None, cache_dir: str | os.PathLike | None = None
) -> OriginalFormatFolders:
    """The stand-ins for `spec`, generated once per cache (atomically: temp folder + rename)."""
    from vllm_prumerge.testing.checkpoint import default_cache_dir

    spec = spec or OriginalFormatSpec()
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    target = base / f"original-format-{spec.key()}"
    if not (target / "llava-full" / "config.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
        write_original_format(tmp, spec)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its stand-ins are identical
            shutil.rmtree(tmp, ignore_errors=True)
    return OriginalFormatFolders(
        base=target / "vicuna",
        vision=target / "clip",
        lora=target / "lora",
        full=target / "llava-full",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write tiny stand-ins of a Vicuna base, an OpenAI CLIP tower, a LLaVA LoRA "
        "training output and a full original-format LLaVA checkpoint (random weights)."
    )
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the weights (default 0)"
    )
    args = parser.parse_args(argv)
    folders = write_original_format(args.out_dir, OriginalFormatSpec(seed=args.seed))
    for field in dataclasses.fields(folders):
        print(f"{field.name}: {getattr(folders, field.name)}")


if __name__ == "__main__":
    main()
