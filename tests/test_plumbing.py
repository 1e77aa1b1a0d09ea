"""Shared plumbing of benchmarks, examples and tests: one home each, and what each home does.

The homes: `vllm_prumerge.testing.media` (data URLs), `.prometheus` (/metrics), `.engine_args`
(the engine options, `--engine-arg`, model resolution), `.towers` (production tower shapes),
`.naive_reference` (the naive transcription of the reduction), `benchmarks/_report.py` (the
baseline rule, the "true limit" section), `.images` (finding and opening images), `.prompts` (chat
prompts; pinned against vLLM in test_chat_prompts.py), `vllm_prumerge.hub_layout` (the
llava-hf key layout) and, for the tests alone, `tests/helpers.py`. The "one home" test reads
the source of benchmarks, examples and tests and fails when one of them defines a helper of these
homes again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Names that only their home may define (function or module-level constant).
HOMES = {
    "data_url": None,  # a home has image_data_url; nobody defines a plain data_url
    "image_data_url": "vllm_prumerge/testing/media.py",
    "video_data_url": "vllm_prumerge/testing/media.py",
    "parse_prometheus": "vllm_prumerge/testing/prometheus.py",
    "fetch_metrics": "vllm_prumerge/testing/prometheus.py",
    "metric_total": "vllm_prumerge/testing/prometheus.py",
    "metric_max": "vllm_prumerge/testing/prometheus.py",
    "parse_engine_arg": "vllm_prumerge/testing/engine_args.py",
    "engine_settings": "vllm_prumerge/testing/engine_args.py",
    "use_cpu_if_no_gpu": "vllm_prumerge/testing/engine_args.py",
    "serve_flags": "vllm_prumerge/testing/engine_args.py",
    "add_number_options": "vllm_prumerge/testing/engine_args.py",
    "TOWER_SHAPES": "vllm_prumerge/testing/towers.py",
    "spec_fields": "vllm_prumerge/testing/towers.py",
    "REAL_TOWERS": None,  # production tower shapes: vllm_prumerge/testing/towers.py
    "naive_prumerge": "vllm_prumerge/testing/naive_reference.py",
    "build_workload": "vllm_prumerge/testing/workload.py",
    "synthetic_checkpoint": "vllm_prumerge/testing/workload.py",
    "SYNTHETIC_SPECS": "vllm_prumerge/testing/workload.py",
    "BASELINE_RULE": "benchmarks/_report.py",
    "pick_baseline": "benchmarks/_report.py",
    "text_section": "benchmarks/_report.py",
    "resolve_model": "vllm_prumerge/testing/engine_args.py",
    "find_images": "vllm_prumerge/testing/images.py",
    "open_image": "vllm_prumerge/testing/images.py",
    "IMAGE_SUFFIXES": "vllm_prumerge/testing/images.py",
    "IMAGE_EXTENSIONS": None,
    "PROMPT_FORMAT": None,  # prompts come from the checkpoint's chat template
    "chat_messages": "vllm_prumerge/testing/prompts.py",
    "image_messages": None,
    "HUB_RENAMES": "vllm_prumerge/hub_layout.py",
    "TOWER_PREFIXES": "vllm_prumerge/hub_layout.py",
    "_TOWER_PREFIXES": None,
    "_hub_key": None,
    # The tests' own plumbing (tests/helpers.py): vLLM's processor without an engine, the
    # subprocess runner, the encoder's counts, per-item placeholder counts, video frames.
    "vllm_processor": "tests/helpers.py",
    "run_python": "tests/helpers.py",
    "encoder_counts": "tests/helpers.py",
    "visual_runs": "tests/helpers.py",
    "frames": "tests/helpers.py",
    "_frames": None,
}
NOT_CHECKED: set[str] = set()  # modules exempt while they move onto these homes: none


def _definitions(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assigned names)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_piece_of_shared_plumbing_is_defined_only_in_its_home():
    sources = [
        p
        for folder in ("benchmarks", "examples", "tests", "vllm_prumerge")
        for p in sorted((ROOT / folder).rglob("*.py"))
    ]
    assert len(sources) > 50
    found = {}
    for path in sources:
        relative = path.relative_to(ROOT).as_posix()
        if relative in NOT_CHECKED:
            continue
        for name in _definitions(path) & HOMES.keys():
            found.setdefault(name, []).append(relative)
    elsewhere = {
        name: [p for p in paths if p != HOMES[name]]
        for name, paths in found.items()
        if any(p != HOMES[name] for p in paths)
    }
    assert elsewhere == {}
    assert {name for name, home in HOMES.items() if home} <= found.keys()  # each home has it


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("gpu_memory_utilization=0.8", ("gpu_memory_utilization", 0.8)),
        (" seed = 1", ("seed", 1)),
        ('limit_mm_per_prompt={"image": 2}', ("limit_mm_per_prompt", {"image": 2})),
        ("kv_cache_dtype=fp8", ("kv_cache_dtype", "fp8")),  # not JSON: kept as the string
        ("served_model_name=a=b", ("served_model_name", "a=b")),  # split at the first "="
        ("enforce_eager=true", ("enforce_eager", True)),
    ],
)
def test_engine_args_parse_values_as_json_when_they_parse(item, expected):
    from vllm_prumerge.testing.engine_args import parse_engine_arg

    assert parse_engine_arg(item) == expected


@pytest.mark.parametrize("item", ["seed", "=1", " =1"])
def test_an_engine_arg_without_a_key_or_an_equals_sign_is_refused(item):
    from vllm_prumerge.testing.engine_args import parse_engine_arg

    with pytest.raises(ValueError, match="--engine-arg expects KEY=VALUE"):
        parse_engine_arg(item)


def test_a_later_engine_arg_wins():
    from vllm_prumerge.testing.engine_args import parse_engine_args

    assert parse_engine_args(["seed=1", "dtype=float32", "seed=2"]) == {
        "seed": 2,
        "dtype": "float32",
    }


def test_a_given_model_is_used_as_given_without_generating_anything(tmp_path, monkeypatch):
    from vllm_prumerge.testing.engine_args import resolve_model

    monkeypatch.setenv("VLLM_PRUMERGE_CACHE", str(tmp_path))
    assert resolve_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert list(tmp_path.iterdir()) == []


def test_images_are_found_by_suffix_in_name_order_and_opened_as_rgb(tmp_path):
    from PIL import Image

    from vllm_prumerge.testing.images import find_images, open_image

    Image.new("L", (5, 3), 200).save(tmp_path / "b.PNG")
    Image.new("RGBA", (4, 4)).save(tmp_path / "a.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder with an image's name is not an image
    files = find_images(tmp_path)
    assert [f.name for f in files] == ["a.webp", "b.PNG"]
    image = open_image(files[1])
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (5, 3), (200, 200, 200))


def test_unreadable_images_and_missing_folders_name_the_path(tmp_path):
    from vllm_prumerge.testing.images import find_images, open_image

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        open_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match=r"image not found: .*gone\.png"):
        open_image(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_images(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        find_images(tmp_path / "broken.png")


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_checkpoint_written_in_the_hub_layout_loads_in_transformers_with_every_weight(
    tmp_path, family
):
    """Independent side: transformers' own conversion of legacy (llava-hf hub) key names when it
    loads a checkpoint; every tensor must arrive where it came from, none missing or unused."""
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AutoModelForImageTextToText,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
    )

    from vllm_prumerge.hub_layout import hub_key, strip_tower_prefix

    vision = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    text = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
    )
    kind = LlavaNextConfig if family == "llava_next" else LlavaConfig
    config = kind(vision_config=vision, text_config=text, image_token_index=3)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    hub = {hub_key(k): v for k, v in state.items()}
    assert len(hub) == len(state)
    assert all(
        k.split(".")[0]
        in {"vision_tower", "multi_modal_projector", "language_model", "image_newline"}
        for k in hub
    )
    config.save_pretrained(tmp_path)
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    tower = [k for k in hub if k.startswith("vision_tower.")]
    assert {strip_tower_prefix(k) for k in tower} == {
        k.removeprefix("model.vision_tower.") for k in state if k.startswith("model.vision_tower.")
    }
    with pytest.raises(ValueError, match="unexpected LLaVA state-dict key"):
        hub_key("something.else")
