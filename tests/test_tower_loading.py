"""Where the tower's weights come from, and what a user sees when they are not there.

A hub id is resolved as vLLM resolves the engine's weights (revision, `--download-dir`,
`HF_HUB_OFFLINE`, token). The hub cases run offline in one subprocess (the environment variables
are read when huggingface_hub is imported) against checkpoints placed in a Hugging Face cache
layout under a real hub id, sharded like the hub's; the loaded tower is compared with the one
transformers loads from the same files (an independent loader).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from vllm_prumerge.encoder import load_vision_tower

HUB_ID = "llava-hf/llava-1.5-7b-hf"
TOWER_SHARD = "model-00001-of-00002.safetensors"
REST_SHARD = "model-00002-of-00002.safetensors"


def assets(checkpoint: str, out: Path) -> Path:
    """Copy everything of the checkpoint but its weights (config, tokenizer, processor)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(checkpoint).iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    return out


def sharded(checkpoint: str, out: Path) -> Path:
    """The checkpoint with its weights in two shards (tower, rest) and an index, as on the hub."""
    assets(checkpoint, out)
    tensors = load_file(str(Path(checkpoint) / "model.safetensors"))
    tower = {k: v for k, v in tensors.items() if k.startswith("vision_tower.")}
    rest = {k: v for k, v in tensors.items() if k not in tower}
    save_file(tower, str(out / TOWER_SHARD), metadata={"format": "pt"})
    save_file(rest, str(out / REST_SHARD), metadata={"format": "pt"})
    weight_map = {k: TOWER_SHARD for k in tower} | {k: REST_SHARD for k in rest}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return out


def hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Place `files` in a Hugging Face hub cache (`cache` as `cache_dir`) as `repo_id`'s main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)


def vision_config(checkpoint: str):
    return AutoConfig.from_pretrained(checkpoint).vision_config


def test_a_local_checkpoint_without_safetensors_is_refused_naming_the_missing_weights(
    tiny_llava, tmp_path
):
    folder = assets(tiny_llava, tmp_path / "no-weights")
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights .* in .*no-weights"):
        load_vision_tower(str(folder), vision_config(tiny_llava))


def test_a_local_checkpoint_without_tower_tensors_is_refused_naming_the_tower(tiny_llava, tmp_path):
    folder = assets(tiny_llava, tmp_path / "llm-only")
    tensors = load_file(str(Path(tiny_llava) / "model.safetensors"))
    llm = {k: v for k, v in tensors.items() if not k.startswith("vision_tower.")}
    save_file(llm, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no vision-tower tensors"):
        load_vision_tower(str(folder), vision_config(tiny_llava))


def test_a_tower_shard_the_index_lists_but_the_folder_lacks_is_named(tiny_llava, tmp_path):
    folder = sharded(tiny_llava, tmp_path / "sharded")
    (folder / TOWER_SHARD).unlink()
    with pytest.raises(FileNotFoundError, match=TOWER_SHARD):
        load_vision_tower(str(folder), vision_config(tiny_llava))


# Runs offline (HF_HUB_OFFLINE=1) with an HF_HOME whose hub cache holds HUB_ID sharded as on the
# hub, and a DOWNLOAD_DIR cache holding HUB_ID's config, tokenizer and processor but no weights.
_OFFLINE_SCRIPT = """
import json, sys
import torch
from transformers import AutoConfig, LlavaForConditionalGeneration
from vllm_prumerge import engine_kwargs
from vllm_prumerge.encoder import load_vision_tower

hub_id, download_dir, local = sys.argv[1:4]
vision = AutoConfig.from_pretrained(local).vision_config
out = {}
try:
    load_vision_tower("llava-hf/not-in-any-cache", vision)
except Exception as exc:
    out["miss"] = {"type": type(exc).__name__, "notes": getattr(exc, "__notes__", [])}

reference = LlavaForConditionalGeneration.from_pretrained(local, dtype=torch.float32)
tower = reference.model.vision_tower
reference = getattr(tower, "vision_model", tower).state_dict()


def largest_difference(tower):
    state = getattr(tower, "vision_model", tower).state_dict()
    return max((state[k] - reference[k]).abs().max().item() for k in state)


out["hub_id_difference"] = largest_difference(load_vision_tower(hub_id, vision))
try:
    load_vision_tower(hub_id, vision, download_dir=download_dir)
except Exception as exc:
    out["download_dir"] = {"type": type(exc).__name__, "message": str(exc)}

from vllm.engine.arg_utils import EngineArgs
from vllm.multimodal import MULTIMODAL_REGISTRY

args = EngineArgs(model=hub_id, download_dir=download_dir, dtype="float32",
                  **engine_kwargs("prumerge"))
model_config = args.create_model_config()
encoder = MULTIMODAL_REGISTRY.create_processor(model_config).info.encoder
out["engine"] = {
    "model": model_config.model,
    "encoder_model": encoder.model,
    "encoder_download_dir": encoder.download_dir,
    "difference": largest_difference(encoder.tower),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def offline(tiny_llava, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("offline-hub")
    hf_home, download_dir = root / "hf-home", root / "download-dir"
    hub_cache(hf_home / "hub", HUB_ID, sharded(tiny_llava, root / "sharded"))
    hub_cache(download_dir, HUB_ID, assets(tiny_llava, root / "assets"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "VLLM_TARGET_DEVICE": "cpu",
    }
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, HUB_ID, str(download_dir), tiny_llava],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    return {"download_dir_path": str(download_dir), **results}


@pytest.mark.script
def test_an_offline_cache_miss_is_the_hubs_own_error_with_a_note_naming_the_checkpoint(offline):
    miss = offline["miss"]
    assert miss["type"] == "LocalEntryNotFoundError"
    assert any("llava-hf/not-in-any-cache" in note for note in miss["notes"])
    assert any("HF_HUB_OFFLINE=1" in note for note in miss["notes"])


@pytest.mark.script
def test_a_hub_id_offline_loads_the_tower_shard_from_the_hub_cache(offline):
    assert offline["hub_id_difference"] == 0.0


@pytest.mark.script
def test_a_download_dir_is_the_cache_looked_in_and_its_lack_of_weights_is_named(offline):
    """The download dir's snapshot has no weights (the default cache has them): the error names
    the missing weights in the download dir, so that is where the tower was looked for."""
    assert offline["download_dir"]["type"] == "FileNotFoundError"
    assert "no safetensors weights" in offline["download_dir"]["message"]
    looked_in = offline["download_dir"]["message"].split(" in ")[1]
    assert looked_in.startswith(offline["download_dir_path"])


@pytest.mark.script
def test_the_servers_pre_processor_reads_the_folder_the_engine_loads(offline):
    """Through vLLM's EngineArgs -> ModelConfig -> multimodal processor, as `vllm serve` builds
    them: offline, vLLM swaps the hub id for its cached snapshot (the folder the engine loads);
    the tower comes from that folder, and the engine's download dir reaches the encoder."""
    engine = offline["engine"]
    assert engine["encoder_model"] == engine["model"]
    assert "snapshots" in engine["model"]
    assert engine["encoder_download_dir"] == offline["download_dir_path"]
    assert engine["difference"] == 0.0
