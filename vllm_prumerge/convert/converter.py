"""Original LLaVA (LoRA or full) + Vicuna + OpenAI CLIP -> one llava-hf LLaVA-1.5 checkpoint.

`convert()` first reads every config, key, shape and rank and checks them against each other and
against the llava-hf model they must fill (built on the meta device, so no memory); only then
does it write, into a staging folder next to `out` that is renamed at the end. Tensors are
streamed one at a time: read, merged in float32, cast, written, dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_prumerge.convert import assets, original
from vllm_prumerge.convert.lora import ADAPTER_FILES, LoraAdapter
from vllm_prumerge.convert.weights import (
    ConversionError,
    TensorReader,
    WeightFile,
    WeightFolder,
    load_pickle,
)
from vllm_prumerge.convert.writer import PlannedTensor, StagingFolder, write_shards
from vllm_prumerge.hub_layout import TOWER_PREFIXES, hub_key
from vllm_prumerge.vision import num_patches

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
NON_LORA = "non_lora_trainables.bin"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    out: Path
    mode: str
    dtype: str
    merged_modules: int  # LoRA-merged linear layers (0 without --lora)
    tensors: int
    shards: int
    image_token_id: int
    vocab_size: int


def resolve(source: str, what: str, patterns: list[list[str]]) -> Path:
    """A local folder, or a Hugging Face hub id fetched with `snapshot_download`.

    `patterns`: allow-pattern sets tried in order until one brings weights (safetensors first,
    so a repository holding both formats is not downloaded twice).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{source}: the {what} must be a folder, not a file")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ConversionError(f"{source}: no such folder (the {what}: a folder or a hub id)")
    from huggingface_hub import snapshot_download

    folder = None
    for allow in patterns:
        try:
            folder = Path(snapshot_download(repo_id=source, allow_patterns=allow))
        except Exception as exc:
            raise ConversionError(
                f"{source}: neither a local folder nor a downloadable hub id of the {what} ({exc})"
            ) from exc
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
            break
    return folder


_BASE_PATTERNS = [
    ["*.json", "*.model", "*.safetensors"],
    ["*.json", "*.model", "*.bin"],
]
_LORA_PATTERNS = [["*.json", "*.bin", "*.safetensors"]]


def _producer(
    reader: TensorReader,
    folder: WeightFolder | None,
    key: str,
    dtype: torch.dtype,
    source: dict[str, torch.Tensor] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        tensor = source[key] if source is not None else reader.get(folder, key)
        if transform is not None:
            tensor = transform(tensor)
        return tensor.to(dtype)

    return produce


def _extend_rows(unk_id: int, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Append copies of row `unk_id` until the matrix has `rows` rows."""

    def extend(weight: torch.Tensor) -> torch.Tensor:
        extra = rows - weight.shape[0]
        if extra <= 0:
            return weight
        return torch.cat([weight, weight[unk_id : unk_id + 1].expand(extra, -1)])

    return extend


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a llava-hf checkpoint for `config` (a meta-device model: no memory)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {hub_key(key): tuple(value.shape) for key, value in model.state_dict().items()}


@dataclasses.dataclass(frozen=True)
class _Sources:
    """The inputs of a conversion, resolved to folders and checked against each other."""

    base_dir: Path
    base_config: dict
    llava_config: dict  # LLaVA's own config: the adapter's, or the base's (original format)
    llava_config_path: Path
    adapter: LoraAdapter | None
    lora_dir: Path | None
    non_lora: dict[str, torch.Tensor]  # the adapter's trained non-LoRA tensors (projector)
    vision_dir: Path
    vision_config: object  # transformers CLIPVisionConfig
    base_weights: WeightFolder
    tower_weights: WeightFolder
    base_shapes: dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class _Target:
    """The llava-hf checkpoint to write: its config, tokenizer and embedding rows."""

    config: object  # transformers LlavaConfig
    tokenizer: object
    image_token_id: int
    unk_id: int
    rows: int  # embedding and head rows (the base's, or enough for the image token)
    dtype: torch.dtype


_EMBED_KEY = "model.embed_tokens.weight"
# The LlamaConfig fields an adapter's LLaVA config must share with the base model.
_SHARED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def convert(
    base: str,
    out: str | os.PathLike,
    lora: str | None = None,
    vision: str | None = None,
    mode: str = "prumerge",
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool | None = None,
) -> ConversionResult:
    """Convert to a llava-hf LLaVA-1.5 checkpoint in `out`; see `vllm-prumerge convert --help`.

    Raises ConversionError (nothing written to `out`) for any bad input.
    """
    from vllm_prumerge.config import PruMergeConfig

    out = Path(out).expanduser()
    try:
        prumerge = PruMergeConfig(mode=mode)
    except ValueError as exc:
        raise ConversionError(f"--mode: {exc}") from None
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # Fail on a non-empty --out before any download.
    StagingFolder(out, overwrite)

    sources = _read_sources(base, lora, vision)
    target = _target(sources, dtype)
    reader = TensorReader()
    plan = _plan(sources, target, reader)
    config_dict = target.config.to_dict()
    config_dict.pop("transformers_version", None)
    config_dict["architectures"] = ["LlavaForConditionalGeneration"]
    config_dict["dtype"] = str(target.dtype).removeprefix("torch.")
    config_dict["prumerge"] = {"mode": prumerge.mode}
    pad_to_square = sources.llava_config.get("image_aspect_ratio") == "pad"
    processor = assets.image_processor(sources.vision_dir, pad_to_square)
    shards = _write(
        out, overwrite, plan, target, config_dict, processor, reader, max_shard_size, progress
    )
    return ConversionResult(
        out=out,
        mode=prumerge.mode,
        dtype=config_dict["dtype"],
        merged_modules=len(sources.adapter.pairs) if sources.adapter is not None else 0,
        tensors=len(plan),
        shards=shards,
        image_token_id=target.image_token_id,
        vocab_size=target.rows,
    )


def _read_sources(base: str, lora: str | None, vision: str | None) -> _Sources:
    """Resolve base, adapter and tower; read and cross-check their configs and shapes."""
    base_dir = resolve(base, "base model", _BASE_PATTERNS)
    base_config = original.read_json(base_dir / "config.json", "the base model's config")
    adapter = None
    lora_dir: Path | None = None
    non_lora: dict[str, torch.Tensor] = {}
    if lora is not None:
        lora_dir = resolve(lora, "LoRA adapter", _LORA_PATTERNS)
        llava_config_path = lora_dir / "config.json"
        llava_config = original.read_json(llava_config_path, "LLaVA's config of the adapter")
        adapter = LoraAdapter(lora_dir)
        non_lora_path = lora_dir / NON_LORA
        if not non_lora_path.is_file():
            raise ConversionError(f"{non_lora_path}: missing (it holds the trained projector)")
        non_lora = {original.strip_peft_prefix(k): v for k, v in load_pickle(non_lora_path).items()}
        for field in _SHARED_FIELDS:
            if field in llava_config and llava_config.get(field) != base_config.get(field):
                raise ConversionError(
                    f"{llava_config_path}: {field} = {llava_config.get(field)} but the base "
                    f"model has {base_config.get(field)} ({base_dir / 'config.json'}): "
                    "is BASE the adapter's base model?"
                )
    else:
        llava_config_path = base_dir / "config.json"
        llava_config = base_config
        if not original.is_llava_config(llava_config):
            raise ConversionError(
                f"{llava_config_path}: a plain language model (no mm_projector_type); pass "
                f"--lora with the LLaVA adapter folder ({', '.join(ADAPTER_FILES)}, {NON_LORA}), "
                "or an original-format LLaVA checkpoint as --base"
            )
    original.check_llava15(llava_config, llava_config_path)
    if original.is_llava_config(base_config) and lora is not None:
        original.check_llava15(base_config, base_dir / "config.json")

    vision_source = vision or llava_config.get("mm_vision_tower")
    if not vision_source:
        raise ConversionError(f"{llava_config_path}: no mm_vision_tower; pass --vision")
    vision_dir = resolve(
        vision_source,
        "CLIP vision tower",
        [["*.json", "*.safetensors"], ["*.json", "pytorch_model.bin"]],
    )
    vision_config = assets.vision_config(vision_dir)
    base_weights = WeightFolder(base_dir, "base model")
    tower_weights = WeightFolder(vision_dir, "CLIP vision tower")
    base_shapes = {k: base_weights.shape(k) for k in base_weights.names()}
    if adapter is not None:
        adapter.validate(base_shapes, str(base_dir))
    return _Sources(
        base_dir=base_dir,
        base_config=base_config,
        llava_config=llava_config,
        llava_config_path=llava_config_path,
        adapter=adapter,
        lora_dir=lora_dir,
        non_lora=non_lora,
        vision_dir=vision_dir,
        vision_config=vision_config,
        base_weights=base_weights,
        tower_weights=tower_weights,
        base_shapes=base_shapes,
    )


def _merge(adapter: LoraAdapter, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda weight: adapter.merged(key, weight)


def _chain(first, second):
    if first is None:
        return second
    return lambda tensor: second(first(tensor))


def _progress_bar(total: int, enabled: bool | None):
    from tqdm import tqdm

    # enabled=None: tqdm's own rule, a bar only on a terminal.
    return tqdm(
        total=total, unit="tensor", desc="convert", disable=None if enabled is None else not enabled
    )


def _target(sources: _Sources, dtype: str | None) -> _Target:
    """The output dtype, the tokenizer with its image token, and the llava-hf config."""
    from transformers import LlamaConfig, LlavaConfig

    base_dir = sources.base_dir
    out_dtype = DTYPES[dtype] if dtype is not None else sources.base_weights.floating_dtype()
    if out_dtype not in DTYPES.values():
        raise ConversionError(
            f"{base_dir}: weights are {out_dtype}; pass --dtype ({', '.join(DTYPES)})"
        )
    tokenizer = assets.load_tokenizer(base_dir)
    image_token_id = tokenizer.convert_tokens_to_ids(assets.IMAGE_TOKEN)
    if _EMBED_KEY not in sources.base_shapes:
        raise ConversionError(f"{base_dir}: the base model has no {_EMBED_KEY!r}")
    rows = max(sources.base_shapes[_EMBED_KEY][0], image_token_id + 1)

    text_fields = original.text_config_fields(sources.base_config)
    text_fields.update(vocab_size=rows, pad_token_id=tokenizer.pad_token_id)
    text_fields.pop("torch_dtype", None)
    text_fields.pop("dtype", None)
    config = LlavaConfig(
        vision_config=sources.vision_config,
        text_config=LlamaConfig(**text_fields),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=sources.llava_config.get("mm_vision_select_layer", -2),
        image_seq_length=num_patches(sources.vision_config),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    return _Target(config, tokenizer, image_token_id, tokenizer.unk_token_id, rows, out_dtype)


class _Plan:
    """Every output tensor: where it comes from and how it is made, checked against the
    llava-hf model it must fill (a meta-device model: no memory)."""

    def __init__(self, config) -> None:
        self.expected = _expected_shapes(config)
        self.tensors: dict[str, PlannedTensor] = {}

    def add(self, key: str, shape: tuple[int, ...], produce, origin: str) -> None:
        expected = self.expected
        if key not in expected:
            raise ConversionError(f"{origin}: no place for it in a LLaVA-1.5 checkpoint ({key})")
        if key in self.tensors:
            raise ConversionError(f"{origin}: {key} is given twice")
        if shape != expected[key]:
            raise ConversionError(
                f"{origin}: shape {list(shape)}, but a LLaVA-1.5 checkpoint of this base and "
                f"tower needs {list(expected[key])} for {key}"
            )
        self.tensors[key] = PlannedTensor(key, shape, produce)

    @staticmethod
    def hub_key(key: str, origin: str) -> str | None:
        try:
            return original.hub_key(key)
        except KeyError:
            raise ConversionError(
                f"{origin}: unknown key {key!r} (not part of a LLaVA-1.5 checkpoint)"
            ) from None


def _plan(sources: _Sources, target: _Target, reader: TensorReader) -> list[PlannedTensor]:
    """Plan the base's, the adapter's non-LoRA and the tower's tensors, in that order (LoRA
    merged, embedding rows extended); raise for a tensor without a place or a place without a
    tensor."""
    plan = _Plan(target.config)
    adapter, non_lora, out_dtype = sources.adapter, sources.non_lora, target.dtype
    extend = _extend_rows(target.unk_id, target.rows)
    rows_of = {_EMBED_KEY, "lm_head.weight"}
    base_weights, tower_weights = sources.base_weights, sources.tower_weights
    for key in base_weights.names():
        origin = f"{base_weights.file_of(key)}: {key!r}"
        hub = plan.hub_key(key, origin)
        if hub is None or key in non_lora:
            continue
        shape = sources.base_shapes[key]
        transform = None
        if adapter is not None and key.removesuffix(".weight") in adapter.pairs:
            transform = _merge(adapter, key)
        if key in rows_of:
            transform = _chain(transform, extend)
            shape = (target.rows, *shape[1:])
        produce = _producer(reader, base_weights, key, out_dtype, transform=transform)
        plan.add(hub, shape, produce, origin)
    for key, tensor in non_lora.items():
        origin = f"{sources.lora_dir / NON_LORA}: {key!r}"
        hub = plan.hub_key(key, origin)
        if hub is None:
            continue
        shape = tuple(tensor.shape)
        transform = None
        if key in rows_of:
            transform = extend
            shape = (target.rows, *shape[1:])
        plan.add(hub, shape, _producer(reader, None, key, out_dtype, non_lora, transform), origin)
    for key in tower_weights.names():
        hub = original.tower_hub_key(key)
        if hub is None or hub in plan.tensors:  # a tower saved in the LLaVA checkpoint wins
            continue
        origin = f"{tower_weights.file_of(key)}: {key!r}"
        produce = _producer(reader, tower_weights, key, out_dtype)
        plan.add(hub, tower_weights.shape(key), produce, origin)
    _check_complete(sources, plan)
    return list(plan.tensors.values())


def _check_complete(sources: _Sources, plan: _Plan) -> None:
    missing = [k for k in plan.expected if k not in plan.tensors]
    if not missing:
        return
    base_name = str(sources.base_dir)
    where = {
        "multi_modal_projector.": f"{sources.lora_dir / NON_LORA}"
        if sources.adapter is not None
        else base_name,
        TOWER_PREFIXES: str(sources.vision_dir),
    }
    source = next((v for p, v in where.items() if missing[0].startswith(p)), base_name)
    raise ConversionError(
        f"{source}: missing the weights of {missing[0]} (and {len(missing) - 1} more)"
        if len(missing) > 1
        else f"{source}: missing the weights of {missing[0]}"
    )


def _write(
    out: Path,
    overwrite: bool,
    ordered: list[PlannedTensor],
    target: _Target,
    config_dict: dict,
    processor,
    reader: TensorReader,
    max_shard_size: int,
    progress: bool | None,
) -> int:
    """Write shards, config, generation config, tokenizer and processor into a staging folder
    renamed to `out` at the end; return the number of shards."""
    tokenizer = target.tokenizer
    with StagingFolder(out, overwrite) as staging:
        bar = _progress_bar(len(ordered), progress)
        try:
            names = write_shards(staging, ordered, target.dtype, max_shard_size, bar.update)
        finally:
            bar.close()
            reader.close()
        (staging / "config.json").write_text(
            json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
        )
        generation = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        assets.save_processor(staging, tokenizer, processor, target.config.vision_config.patch_size)
    return len(names)


__all__ = ["DTYPES", "ConversionError", "ConversionResult", "WeightFile", "convert"]
