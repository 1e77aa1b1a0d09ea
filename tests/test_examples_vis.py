"""vllm_prumerge.vis and examples/visualize.py: token maps agree with the core reduction."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_cache_env
from vllm_prumerge import PruMergeConfig, vis
from vllm_prumerge.reduction import reduce_tokens

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str, env=None, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def synthetic_batch(batch: int = 3, n_patches: int = 576, width: int = 32, seed: int = 0):
    """Features, q_cls and keys with a few high-attention patches per image."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n_patches, width, generator=generator)
    keys = torch.randn(batch, n_patches + 1, width, generator=generator)
    q_cls = 0.3 * torch.randn(batch, width, generator=generator)
    for b in range(batch):
        hot = torch.randperm(n_patches, generator=generator)[: 5 + 7 * b] + 1
        keys[b, hot] += 20.0 * q_cls[b] / q_cls[b].norm()
    return features, q_cls, keys


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
def test_token_map_counts_add_up_to_the_reduced_lengths(mode):
    reduced = reduce_tokens(*synthetic_batch(), PruMergeConfig(mode=mode))
    for b in range(reduced.batch_size):
        tmap = vis.token_map(reduced, b)
        counts = tmap.counts()
        assert tmap.grid == 24
        assert counts["tokens"] == reduced.host_lengths[b] == counts["kept"] + 1
        assert counts["outliers"] == int(reduced.num_outliers[b])
        assert counts["outliers"] + counts["samples"] == counts["kept"]
        assert sorted(tmap.kept.tolist()) == sorted(reduced.split_kept_indices()[b].tolist())
        if mode == "prumerge":
            assert counts["samples"] == 0
        roles = np.bincount(tmap.roles, minlength=5)
        assert roles[vis.ROLE_OUTLIER] == counts["outliers"]
        assert roles[vis.ROLE_SAMPLE] == counts["samples"]
        assert roles.sum() == 576


def test_every_patch_maps_to_itself_a_kept_token_or_the_extra_token():
    reduced = reduce_tokens(*synthetic_batch(), PruMergeConfig(mode="prumerge+"))
    for b in range(reduced.batch_size):
        tmap = vis.token_map(reduced, b)
        kept = set(tmap.kept.tolist())
        for patch, target in enumerate(tmap.merged_into.tolist()):
            if patch in kept:
                assert target == patch
            else:
                assert target == vis.EXTRA or target in kept
        merged = (tmap.roles == vis.ROLE_PRUNED_TO_KEPT).sum()
        assert merged == sum(
            1 for p, t in enumerate(tmap.merged_into.tolist()) if t not in (p, vis.EXTRA)
        )


def test_outliers_and_samples_do_not_depend_on_the_output_order():
    inputs = synthetic_batch()
    by_reference = reduce_tokens(*inputs, PruMergeConfig(mode="prumerge+"))
    by_raster = reduce_tokens(*inputs, PruMergeConfig(mode="prumerge+", order="raster"))
    for b in range(by_reference.batch_size):
        a, r = vis.token_map(by_reference, b), vis.token_map(by_raster, b)
        assert a.outliers.tolist() == r.outliers.tolist()
        assert a.samples.tolist() == r.samples.tolist()
        assert sorted(a.kept.tolist()) == sorted(r.kept.tolist())
        # Reference order: the outliers head the kept tokens, in descending attention.
        assert a.kept[: len(a.outliers)].tolist() == a.outliers.tolist()


def test_mode_off_marks_every_patch_as_passed_through():
    reduced = reduce_tokens(*synthetic_batch(batch=1), PruMergeConfig(mode="off"))
    tmap = vis.token_map(reduced, 0)
    assert tmap.passthrough and not tmap.has_extra_token
    assert tmap.num_tokens == 576
    assert (tmap.roles == vis.ROLE_PASSTHROUGH).all()
    assert tmap.merged_into.tolist() == list(range(576))


def test_token_map_rejects_an_image_index_outside_the_batch():
    reduced = reduce_tokens(*synthetic_batch(batch=2), PruMergeConfig())
    with pytest.raises(IndexError):
        vis.token_map(reduced, 2)


def test_figures_render_to_png_files(tmp_path):
    reduced = reduce_tokens(*synthetic_batch(batch=1), PruMergeConfig(mode="prumerge+"))
    tmap = vis.token_map(reduced, 0)
    image = Image.new("RGB", (336, 336), (200, 120, 40))
    path = vis.save_figure(vis.draw_token_map(image, tmap, title="t"), tmp_path / "a" / "m.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (1600, 580)
    hist = vis.save_figure(
        vis.draw_count_histogram({"prumerge": [3, 9, 9], "prumerge+": []}, num_patches=576),
        tmp_path / "h.png",
    )
    with Image.open(hist) as png:
        assert png.format == "PNG"
    empty = vis.save_figure(vis.draw_count_histogram({}), tmp_path / "empty.png")
    assert Path(empty).stat().st_size > 0


def test_model_input_image_undoes_the_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    target = torch.rand(3, 8, 8)
    pixel_values = (target - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    image = vis.model_input_image(pixel_values, mean, std)
    back = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert image.size == (8, 8)
    assert torch.allclose(back, target, atol=1 / 255)


# --- examples/visualize.py, run like a user would --------------------------------------------


def encoder_reduction(checkpoint: str, paths: list[Path], config: PruMergeConfig):
    """The core reduction of these image files, through PruMergeEncoder (the reference)."""
    from transformers import AutoConfig, AutoProcessor

    from vllm_prumerge.encoder import PruMergeEncoder

    hf_config = AutoConfig.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint).image_processor
    encoder = PruMergeEncoder(checkpoint, hf_config.vision_config, device="cpu")
    images = [Image.open(p).convert("RGB") for p in paths]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    return encoder.encode(pixel_values, config)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    done = run_example("make_inputs.py", folder, "--images", 3, "--broken")
    assert done.returncode == 0, done.stderr
    return folder


def test_visualize_tokens_writes_pngs_and_the_core_reductions_numbers(tiny_llava, inputs, tmp_path):
    env = tiny_cache_env(tiny_llava, tmp_path)
    out = tmp_path / "vis"
    images = [inputs / "scene_00.png", inputs / "scene_02.png"]
    args = ["tokens", "--tiny", "--mode", "prumerge+", "--out-dir", out]
    done = run_example("visualize.py", *args, *images, inputs / "broken.png", env=env)
    assert done.returncode == 0, done.stderr
    assert "broken.png" in done.stderr  # the unreadable image is reported and skipped
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"scene_0{i}.tokens.{ext}" for i in (0, 2) for ext in ("json", "png")]
    encoded = encoder_reduction(tiny_llava, images, PruMergeConfig(mode="prumerge+"))
    for b, path in enumerate(images):
        record = json.loads((out / f"{path.stem}.tokens.json").read_text())
        assert record["tokens"] == len(encoded.features[b])
        assert record["kept_indices"] == encoded.reduced.split_kept_indices()[b].tolist()
        assert record["outliers"] == int(encoded.reduced.num_outliers[b])
        assert record["outliers"] + record["samples"] + 1 == record["tokens"]
        assert len(record["merged_into"]) == len(record["roles"]) == 576
        with Image.open(out / f"{path.stem}.tokens.png") as png:
            assert png.format == "PNG" and png.size == (1600, 580)


def test_visualize_histogram_counts_every_image_of_the_folder(tiny_llava, inputs, tmp_path):
    env = tiny_cache_env(tiny_llava, tmp_path)
    png = tmp_path / "out" / "hist.png"
    args = shlex.split("histogram --tiny --modes prumerge prumerge+ fixed --budget 10")
    done = run_example("visualize.py", *args, "--out", png, inputs, env=env)
    assert done.returncode == 0, done.stderr
    with Image.open(png) as image:
        assert image.format == "PNG"
    records = [json.loads(line) for line in png.with_suffix(".jsonl").read_text().splitlines()]
    errors = [r for r in records if r["error"]]
    assert [Path(r["image"]).name for r in errors] == ["broken.png"]
    counted = sorted((r for r in records if not r["error"]), key=lambda r: r["image"])
    paths = [Path(r["image"]) for r in counted]
    assert [p.name for p in paths] == ["scene_00.png", "scene_01.png", "scene_02.png"]
    for mode, options in (("prumerge", {}), ("prumerge+", {}), ("fixed", {"budget": 10})):
        encoded = encoder_reduction(tiny_llava, paths, PruMergeConfig(mode=mode, **options))
        assert [r["tokens"][mode] for r in counted] == [len(f) for f in encoded.features]
    assert all(r["tokens"]["fixed"] == 11 for r in counted)
