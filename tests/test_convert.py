"""`vllm-prumerge convert` without an engine: the merge, the layout, the tokenizer, bad input.

Expected values are computed here from the original-format files with plain torch /
SentencePiece / safetensors, never with the converter's own helpers (except `lora_delta`, which
is pinned against hand-worked numbers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_prumerge.convert import ConversionError, convert
from vllm_prumerge.convert.cli import main as cli_main
from vllm_prumerge.convert.lora import LoraConfig, lora_delta

STEM = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from vllm_prumerge.testing.original_format import cached_original_format

    return cached_original_format(cache_dir=tmp_path_factory.mktemp("original-format"))


def _convert(stand_ins, out, **kwargs):
    args = dict(base=str(stand_ins.base), lora=str(stand_ins.lora), vision=str(stand_ins.vision))
    return convert(out=out, **{**args, **kwargs})


@pytest.fixture(scope="module")
def converted(stand_ins, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "fp32"
    _convert(stand_ins, out, dtype="float32", mode="prumerge_plus", max_shard_size=300_000)
    return out


def _load_output(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  safe_open is not a dict
                assert index["weight_map"][key] == name
                tensors[key] = f.get_tensor(key)
    assert set(tensors) == set(index["weight_map"])
    return tensors


def _base_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return state


# ---- the merge as PEFT defines it -------------------------------------------------------------


def test_lora_delta_is_scaling_times_b_at_a_and_transposed_for_fan_in_fan_out():
    a = torch.tensor([[1.0, 2.0, 3.0]])  # [r=1, in=3]
    b = torch.tensor([[2.0], [-1.0]])  # [out=2, r=1]
    expected = torch.tensor([[2.0, 4.0, 6.0], [-1.0, -2.0, -3.0]]) * 0.5
    assert torch.equal(lora_delta(a, b, 0.5), expected)
    assert torch.equal(lora_delta(a, b, 0.5, fan_in_fan_out=True), expected.T)
    assert lora_delta(a.half(), b.bfloat16(), 1.0).dtype == torch.float32


def test_scaling_follows_r_alpha_rslora_and_patterns(tmp_path):
    path = tmp_path / "adapter_config.json"
    base = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}
    path.write_text(json.dumps(base))
    assert LoraConfig.from_file(path).scaling("model.layers.0.self_attn.q_proj") == 2.0
    path.write_text(json.dumps({**base, "use_rslora": True}))
    assert LoraConfig.from_file(path).scaling("model.layers.0.self_attn.q_proj") == 32 / 4
    patterns = {"rank_pattern": {"layers.1.self_attn.q_proj": 4}, "alpha_pattern": {"q_proj": 8}}
    path.write_text(json.dumps({**base, **patterns}))
    config = LoraConfig.from_file(path)
    assert config.scaling("model.layers.1.self_attn.q_proj") == 8 / 4
    assert config.scaling("model.layers.0.self_attn.q_proj") == 8 / 16
    assert config.targets("model.layers.0.self_attn.q_proj")
    assert not config.targets("model.layers.0.self_attn.k_proj")


def test_merged_weights_equal_base_plus_scaled_lora_product(stand_ins, converted):
    out = _load_output(converted)
    base = _base_state(stand_ins.base)
    adapter = torch.load(stand_ins.lora / "adapter_model.bin", weights_only=True)
    config = json.loads((stand_ins.lora / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    merged = 0
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        expected = weight.float()
        if f"base_model.model.{module}.lora_A.weight" in adapter:
            a = adapter[f"base_model.model.{module}.lora_A.weight"].float()
            b = adapter[f"base_model.model.{module}.lora_B.weight"].float()
            expected = expected + scaling * (b @ a)
            merged += 1
        got = out["language_model." + key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            # One appended row for <image>: a copy of <unk>'s (row 0).
            assert torch.equal(got[-1], got[0])
            got = got[:-1]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert merged == 7 * 2
    non_lora = torch.load(stand_ins.lora / "non_lora_trainables.bin", weights_only=True)
    for old, new in (("0", "linear_1"), ("2", "linear_2")):
        for name in ("weight", "bias"):
            assert torch.equal(
                out[f"multi_modal_projector.{new}.{name}"],
                non_lora[f"base_model.model.model.mm_projector.{old}.{name}"].float(),
            )
    clip = torch.load(stand_ins.vision / "pytorch_model.bin", weights_only=True)
    tower = {k: v for k, v in out.items() if k.startswith("vision_tower.")}
    expected_tower = {
        "vision_tower." + k: v for k, v in clip.items() if k.startswith("vision_model.")
    }
    expected_tower.pop("vision_tower.vision_model.embeddings.position_ids")
    assert set(tower) == set(expected_tower)
    assert all(torch.equal(tower[k], expected_tower[k]) for k in tower)


def test_default_dtype_is_the_bases_and_the_cast_comes_after_the_float32_merge(
    stand_ins, converted, tmp_path
):
    _convert(stand_ins, tmp_path / "fp16")
    fp16 = _load_output(tmp_path / "fp16")
    fp32 = _load_output(converted)
    assert {t.dtype for t in fp16.values()} == {torch.float16}
    assert all(torch.equal(fp16[k], fp32[k].half()) for k in fp32)
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert config["dtype"] == "float16"


def test_fan_in_fan_out_is_reset_for_linear_layers_as_peft_does(stand_ins, converted, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    _edit_json(folders.lora / "adapter_config.json", fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        _convert(folders, tmp_path / "fifo", dtype="float32")
    got, expected = _load_output(tmp_path / "fifo"), _load_output(converted)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_small_max_shard_size_writes_several_indexed_shards(converted):
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    on_disk = sorted(p.name for p in converted.glob("*.safetensors"))
    assert on_disk == files
    sizes = sum(t.numel() * t.element_size() for t in _load_output(converted).values())
    assert index["metadata"]["total_size"] == sizes


# ---- config, tokenizer, processor -------------------------------------------------------------


def test_config_records_the_mode_and_the_llava15_layout(stand_ins, converted):
    config = json.loads((converted / "config.json").read_text())
    base = json.loads((stand_ins.base / "config.json").read_text())
    assert config["prumerge"] == {"mode": "prumerge+"}
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == base["vocab_size"]  # 32000 for Vicuna
    assert config["text_config"]["vocab_size"] == base["vocab_size"] + 1
    assert config["text_config"]["pad_token_id"] == 0  # <unk>, as LLaVA trained
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu"


def test_tokenizer_splits_around_image_like_llavas_tokenizer_image_token(stand_ins, converted):
    import sentencepiece as spm
    from transformers import AutoProcessor

    sp = spm.SentencePieceProcessor(model_file=str(stand_ins.base / "tokenizer.model"))
    processor = AutoProcessor.from_pretrained(str(converted))
    image_id = json.loads((converted / "config.json").read_text())["image_token_index"]
    for prompt in (
        "USER: <image>\nWhat is shown in this image? ASSISTANT:",
        "A chat. USER: <image>\n<image>\nHow many objects are there? ASSISTANT:",
        "USER: What colour is the circle 123? ASSISTANT:",
    ):
        expected = [sp.bos_id()]
        for i, chunk in enumerate(prompt.split("<image>")):
            expected += ([image_id] if i else []) + sp.encode(chunk)
        assert processor.tokenizer(prompt).input_ids == expected, prompt
    assert processor.tokenizer.pad_token == "<unk>"


def test_tokenizer_config_carries_no_loading_arguments_and_still_loads(converted):
    """`from_pretrained` arguments (transformers 5 saves `is_local`, `local_files_only`) are not
    settings of the checkpoint; the stripped config reloads with `legacy` and `<image>`."""
    from transformers import AutoTokenizer

    config = json.loads((converted / "tokenizer_config.json").read_text())
    loading = {"is_local", "local_files_only", "cache_dir", "token", "revision", "_commit_hash"}
    assert not loading & config.keys(), sorted(loading & config.keys())
    assert config["legacy"] is True
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    image_id = json.loads((converted / "config.json").read_text())["image_token_index"]
    assert tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert tokenizer("USER: <image>\nHi").input_ids.count(image_id) == 1


def test_processor_pads_to_square_and_template_is_llava_hfs(converted):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(converted))
    wide = Image.new("RGB", (336, 168), (255, 255, 255))
    pixels = processor.image_processor([wide], return_tensors="pt")["pixel_values"][0]
    # Padded with the CLIP mean colour: normalised to ~0 in the top rows, white in the middle.
    assert pixels[:, :40].abs().max() < 0.02
    assert pixels[:, 168].min() > 1.5
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s>USER: <image>\nHi? ASSISTANT:"  # llava-hf's template + LLaVA's BOS
    ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    ids = ids[0] if isinstance(ids[0], list) else ids
    assert ids == processor.tokenizer("USER: <image>\nHi? ASSISTANT:").input_ids  # one BOS


def test_transformers_loads_the_converted_checkpoint_without_missing_keys(converted):
    from transformers import LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(
        str(converted), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_full_original_checkpoint_converts_without_a_merge(stand_ins, tmp_path):
    out = tmp_path / "full"
    result = convert(base=str(stand_ins.full), vision=str(stand_ins.vision), out=out)
    assert result.merged_modules == 0
    got = _load_output(out)
    original = {}
    for path in sorted(stand_ins.full.glob("pytorch_model-*.bin")):
        original.update(torch.load(path, weights_only=True))
    for key, value in original.items():
        if key.startswith("model.mm_projector."):
            linear = {"0": "linear_1", "2": "linear_2"}[key.split(".")[2]]
            new = f"multi_modal_projector.{linear}.{key.split('.')[-1]}"
        else:
            new = "language_model." + key
        expected = value
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = torch.cat([value, value[:1]])
        assert torch.equal(got[new], expected), key
    assert got[new].dtype == torch.float16


# ---- the command line -------------------------------------------------------------------------


@pytest.mark.script
def test_console_script_converts_and_help_explains_every_option(stand_ins, tmp_path, capsys):
    script = Path(sys.executable).parent / "vllm-prumerge"
    out = tmp_path / "cli"
    run = subprocess.run(
        [
            str(script),
            "convert",
            "--base",
            str(stand_ins.base),
            "--lora",
            str(stand_ins.lora),
            "--vision",
            str(stand_ins.vision),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "14 LoRA layers merged" in run.stdout and f"vllm serve {out}" in run.stdout
    assert json.loads((out / "config.json").read_text())["prumerge"] == {"mode": "prumerge"}
    from vllm_prumerge import commands
    from vllm_prumerge.convert import cli

    helps = []
    for main, argv in ((commands.main, ["convert", "--help"]), (cli.main, ["--help"])):
        with pytest.raises(SystemExit) as done:  # the parsers in this process: no start-up each
            main(argv)
        assert done.value.code == 0
        helps.append(capsys.readouterr().out)
    for text in helps:
        for option in ("--base", "--lora", "--vision", "--out", "--mode", "--dtype"):
            assert option in text
        for option in ("--overwrite", "--max-shard-size", "--no-progress"):
            assert option in text
        assert "non_lora_trainables.bin" in text and "prumerge+" in text


def test_progress_bar_counts_every_tensor(stand_ins, tmp_path, capsys):
    _convert(stand_ins, tmp_path / "bar", progress=True)
    err = capsys.readouterr().err
    assert "convert: 100%" in err and "80/80" in err


# ---- bad input: a clear error naming file and key, nothing written ----------------------------


def _copy(stand_ins, tmp_path):
    from vllm_prumerge.testing.original_format import OriginalFormatFolders

    folders = {}
    for name in ("base", "lora", "vision"):
        folders[name] = tmp_path / "in" / name
        shutil.copytree(getattr(stand_ins, name), folders[name])
    return OriginalFormatFolders(**folders, full=stand_ins.full)


def _fails(folders, tmp_path, *fragments, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        _convert(folders, out, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return message


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_files_are_named(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    (folders.lora / "non_lora_trainables.bin").unlink()
    _fails(folders, tmp_path, "non_lora_trainables.bin", "missing")
    (folders.lora / "adapter_config.json").unlink()
    _fails(folders, tmp_path, "adapter_config.json", "missing")
    shutil.copytree(stand_ins.lora, folders.lora, dirs_exist_ok=True)
    (folders.base / "model-00002-of-00002.safetensors").unlink()
    _fails(folders, tmp_path, "model-00002-of-00002.safetensors", "model.safetensors.index.json")


def test_rank_mismatch_names_the_key(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    _edit_json(folders.lora / "adapter_config.json", r=16)
    _fails(folders, tmp_path, "rank mismatch", "model.layers.0.self_attn.q_proj", "r = 16")


def test_shape_mismatch_names_the_key(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    key = f"{STEM}.1.mlp.down_proj.lora_B.weight"
    adapter = torch.load(folders.lora / "adapter_model.bin", weights_only=True)
    adapter[key] = torch.zeros(64, adapter[key].shape[1])
    torch.save(adapter, folders.lora / "adapter_model.bin")
    _fails(folders, tmp_path, "shape mismatch", "model.layers.1.mlp.down_proj", "[64, 256]")


def test_unknown_and_missing_lora_keys_are_named(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    original = torch.load(stand_ins.lora / "adapter_model.bin", weights_only=True)
    some = original[f"{STEM}.0.mlp.up_proj.lora_A.weight"]

    def cases():
        yield {f"{STEM}.0.mlp.lora_magnitude_vector": some}, ("unknown key", "magnitude_vector")
        yield {f"{STEM}.0.foo.lora_A.weight": some}, (f"{STEM}.0.foo.lora_B.weight", "missing")
        pair = {f"{STEM}.0.foo.lora_{w}.weight": some for w in "AB"}
        yield pair, ("model.layers.0.foo.weight", "does not have")

    for extra, fragments in cases():
        torch.save({**original, **extra}, folders.lora / "adapter_model.bin")
        _fails(folders, tmp_path, "adapter_model.bin", *fragments)
    dropped = {k: v for k, v in original.items() if ".1.self_attn.v_proj." not in k}
    torch.save(dropped, folders.lora / "adapter_model.bin")
    _fails(folders, tmp_path, "missing key", f"{STEM}.1.self_attn.v_proj.lora_A.weight")


def test_a_base_that_does_not_match_the_adapter_is_refused(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    _edit_json(folders.lora / "config.json", num_hidden_layers=3)
    _fails(folders, tmp_path, "num_hidden_layers = 3", "is BASE the adapter's base model?")
    # A base with one layer fewer than the adapter (say a 7B base under a 13B adapter).
    _edit_json(folders.lora / "config.json", num_hidden_layers=2)
    state = _base_state(folders.base)
    for path in folders.base.glob("model*.safetensors*"):
        path.unlink()
    save_file(
        {k: v for k, v in state.items() if ".layers.1." not in k},
        str(folders.base / "model.safetensors"),
    )
    message = _fails(folders, tmp_path, "adapter_model.bin", "model.layers.1.")
    assert "does not have" in message


def test_bad_projector_mode_and_plain_base_are_refused(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    _fails(folders, tmp_path, "--mode", "turbo", mode="turbo")
    _fails(folders, tmp_path, "--lora", "plain language model", lora=None)
    _edit_json(folders.lora / "config.json", mm_projector_type="linear")
    _fails(folders, tmp_path, "config.json", "mm_projector_type", "mlp2x_gelu")
    _edit_json(folders.lora / "config.json", mm_projector_type="mlp2x_gelu")
    projector = torch.load(folders.lora / "non_lora_trainables.bin", weights_only=True)
    projector["base_model.model.model.mm_projector.0.weight"] = torch.zeros(128, 32)
    torch.save(projector, folders.lora / "non_lora_trainables.bin")
    _fails(folders, tmp_path, "non_lora_trainables.bin", "mm_projector.0.weight", "[128, 64]")


def test_unknown_hub_id_offline_is_a_clear_error(stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folders = _copy(stand_ins, tmp_path)
    _fails(folders, tmp_path, "nobody/no-such-model", "hub id", vision="nobody/no-such-model")


def test_corrupt_tensor_data_found_while_writing_leaves_nothing(stand_ins, tmp_path):
    folders = _copy(stand_ins, tmp_path)
    shard = folders.base / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])  # header intact, data cut short
    _fails(folders, tmp_path, "model-00002-of-00002.safetensors")


def test_non_empty_out_is_refused_unless_overwrite(stand_ins, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--base", str(stand_ins.base), "--lora", str(stand_ins.lora)]
    args += ["--vision", str(stand_ins.vision), "--out", str(out), "--no-progress"]
    assert cli_main(args) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli_main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folders left
