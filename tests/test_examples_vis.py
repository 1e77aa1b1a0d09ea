"""vllm_prumerge.vis and examples/visualize.py: token maps agree with the core reduction."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_cache_env
from tests.helpers import run_example_main as run_example
from vllm_prumerge import PruMergeConfig, vis
from vllm_prumerge.reduction import reduce_by_importance, reduce_tokens

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.script
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
    # Images are not a video's frames: `temporal` leaves them alone, even an image repeated in
    # one batch (across time, its second copy would be dropped whole).
    twin = tmp_path / "twin.png"
    twin.write_bytes(images[0].read_bytes())
    args += ["--option", "temporal=adaptive", "--out-dir", tmp_path / "temporal"]
    done = run_example("visualize.py", *args, images[0], twin, env=env)
    assert done.returncode == 0, done.stderr
    for name in (images[0].stem, "twin"):
        record = json.loads((tmp_path / "temporal" / f"{name}.tokens.json").read_text())
        assert record["tokens"] == len(encoded.features[0]) and record["unchanged"] == 0


@pytest.mark.script
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


# --- LLaVA-NeXT (every crop on the original image) and SigLIP (27x27) -------------------------


def _rectangles(ax, colour: str) -> int:
    """Open squares of `colour` drawn on a panel (the kept-patch markers)."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    want = to_rgba(colour)
    return sum(
        1
        for p in ax.patches
        if isinstance(p, Rectangle) and not p.get_fill() and p.get_edgecolor() == want
    )


def _gradient(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom: a pixel's colour says where it is."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - (x + y) / 2], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory) -> str:
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava

    cache = tmp_path_factory.getbasetemp() / "checkpoints"
    return str(cached_tiny_llava(TinyLlavaSpec(family="llava_next"), cache_dir=cache))


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory) -> str:
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava

    cache = tmp_path_factory.getbasetemp() / "checkpoints"
    return str(cached_tiny_llava(TinyLlavaSpec(family="siglip"), cache_dir=cache))


@pytest.mark.parametrize(
    "size", [(700, 700), (672, 336), (300, 700), (200, 150), (700, 500), (1000, 333)]
)
def test_anyres_placements_put_every_crop_patch_on_the_pixels_the_processor_gave_it(
    next_checkpoint, size
):
    # The checkpoint's own transformers LlavaNextImageProcessor cuts a gradient image; every
    # patch of every crop must show the colour of the image region its placement names (or
    # the processor's zero padding, black, where the placement lies outside the image).
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = AutoConfig.from_pretrained(next_checkpoint)
    processor = AutoProcessor.from_pretrained(next_checkpoint).image_processor
    image = _gradient(*size)
    pixel_values = processor([image], return_tensors="pt")["pixel_values"][0]
    rows, cols = get_anyres_image_grid_shape((size[1], size[0]), config.image_grid_pinpoints, 336)
    places = vis.anyres_placements(size, config.image_grid_pinpoints)
    assert len(places) == 1 + rows * cols
    assert places[0].label == "base view" and places[1].label == "tile (0, 0)"
    original = np.asarray(image, dtype=np.float32)
    worst, inside, padding = 0.0, 0, 0
    for place, crop in zip(places, pixel_values, strict=False):
        seen = np.asarray(
            vis.model_input_image(crop, processor.image_mean, processor.image_std), np.float32
        )
        for patch in range(place.grid**2):
            row, col = divmod(patch, place.grid)
            shown = seen[row * 14 : row * 14 + 14, col * 14 : col * 14 + 14].mean((0, 1))
            x0, y0 = (float(v) for v in place.patch_origin(patch))
            x1, y1 = x0 + place.cell_width, y0 + place.cell_height
            if x0 >= 0 and y0 >= 0 and x1 <= size[0] and y1 <= size[1]:
                top, left = round(y0), round(x0)
                region = original[top : max(round(y1), top + 1), left : max(round(x1), left + 1)]
                worst = max(worst, float(np.abs(region.mean((0, 1)) - shown).max()))
                inside += 1
            elif x1 <= 0 or y1 <= 0 or x0 >= size[0] or y0 >= size[1]:
                assert shown.max() <= 1.0, (place.label, patch)  # zero padding
                padding += 1
    assert inside >= 576 * len(places) // 2
    assert worst < 2.0  # a quarter-patch shift is ~2.5 colour levels on these gradients
    if size in ((700, 700), (672, 336)):
        assert padding == 0  # the pinpoint's aspect: no padding


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
def test_anyres_figure_draws_each_crops_kept_patches_and_totals(mode):
    reduced = reduce_tokens(*synthetic_batch(batch=5), PruMergeConfig(mode=mode))
    tmaps = [vis.token_map(reduced, k) for k in range(5)]
    places = vis.anyres_placements((700, 500), [[336, 672], [672, 336], [672, 672]])
    fig = vis.draw_anyres_token_maps(
        Image.new("RGB", (700, 500), (40, 90, 200)), places, tmaps, title="t", stock_tokens=2242
    )
    axes = fig.axes  # 2 x 3 panels (+ colour bars after them)
    for panel, crops in ((axes[0], range(1)), (axes[3], range(1, 5))):
        outliers = sum(int(reduced.num_outliers[k]) for k in crops)
        samples = sum(reduced.host_num_kept[k] - int(reduced.num_outliers[k]) for k in crops)
        assert _rectangles(panel, "red") == outliers
        assert _rectangles(panel, "cyan") == samples
        legend = [t.get_text() for t in panel.get_legend().get_texts()]
        assert legend == [f"outliers ({outliers})", f"spatial samples ({samples})"]
    assert _rectangles(axes[2], "red") == int(reduced.num_outliers[0])
    assert _rectangles(axes[5], "red") == int(reduced.num_outliers[1:].sum())
    total = sum(reduced.host_lengths)
    assert vis.total_counts(tmaps)["tokens"] == total
    assert fig.get_suptitle().endswith(f"= {total} tokens (stock: 2242)")


def test_siglip_sized_token_maps_draw_the_27x27_grid():
    features, _, keys = synthetic_batch(batch=1, n_patches=729)
    importance = torch.softmax(features[..., 0] * 3, dim=-1)
    reduced = reduce_by_importance(features, importance, keys[:, 1:], PruMergeConfig())
    tmap = vis.token_map(reduced, 0, importance_name="received attention")
    assert tmap.grid == 27 and tmap.num_patches == 729
    fig = vis.draw_token_map(Image.new("RGB", (384, 384), (9, 9, 9)), tmap, patch_size=14)
    assert _rectangles(fig.axes[0], "red") == int(reduced.num_outliers[0])
    assert fig.axes[0].get_xlim() == (0, 27)
    assert fig.axes[2].get_title().startswith("received attention")


@pytest.fixture(scope="module")
def family_inputs(tmp_path_factory, scenes) -> list[Path]:
    """A 700x500 image (LLaVA-NeXT 2x2 tiles, padded above and below) and a 300x700 one
    (2x1 tiles, padded left and right)."""
    folder = tmp_path_factory.mktemp("family-inputs")
    paths = []
    for name, scene, size in (("wide", scenes[0], (700, 500)), ("tall", scenes[3], (300, 700))):
        paths.append(folder / f"{name}.png")
        scene.resize(size).save(paths[-1])
    return paths


@pytest.mark.script
def test_visualize_tokens_draws_every_crop_of_a_llava_next_image(
    next_checkpoint, family_inputs, tmp_path
):
    from tests.hf_reference import HFPruMergeLlava

    env = tiny_cache_env(next_checkpoint, tmp_path)
    out = tmp_path / "vis"
    args = ["tokens", "--tiny", "--family", "llava_next", "--mode", "prumerge+", "--out-dir", out]
    done = run_example("visualize.py", *args, *family_inputs, env=env)
    assert done.returncode == 0, done.stderr
    hf = HFPruMergeLlava(next_checkpoint)
    config = PruMergeConfig(mode="prumerge+")
    for path in family_inputs:
        image = Image.open(path).convert("RGB")
        record = json.loads((out / f"{path.stem}.tokens.json").read_text())
        crops = hf._crops(image)[0]  # transformers' processor + anyres grid: [K, 3, 336, 336]
        assert record["crops"] == len(crops) == len(record["crop_maps"])
        assert record["tokens"] == len(hf.image_features(image, config))
        for k, crop in enumerate(record["crop_maps"]):
            independent = len(hf._reduce_crops(crops[k : k + 1], config))
            assert crop["tokens"] == independent == crop["outliers"] + crop["samples"] + 1
            assert len(crop["roles"]) == 576
        assert [c["placement"] for c in record["crop_maps"]] == [
            p.to_dict() for p in vis.anyres_placements(image.size, hf.config.image_grid_pinpoints)
        ]
        ids = hf.processor(images=[image], text="<image>", return_tensors="pt").input_ids[0]
        assert record["stock_tokens"] == int((ids == hf.image_token).sum())
        assert f"{path.name}: {record['tokens']} tokens over {record['crops']} crops" in done.stdout
        with Image.open(out / f"{path.stem}.tokens.png") as png:
            assert png.format == "PNG" and png.width == 1600


@pytest.mark.script
def test_visualize_tokens_on_siglip_uses_received_attention_on_27x27(
    siglip_checkpoint, family_inputs, tmp_path
):
    from tests.hf_reference import HFPruMergeLlava

    env = tiny_cache_env(siglip_checkpoint, tmp_path)
    out = tmp_path / "vis"
    args = ["tokens", "--tiny", "--family", "siglip", "--mode", "prumerge", "--out-dir", out]
    done = run_example("visualize.py", *args, family_inputs[0], env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "wide.tokens.json").read_text())
    hf = HFPruMergeLlava(siglip_checkpoint)  # received attention from output_attentions
    image = Image.open(family_inputs[0]).convert("RGB")
    assert record["tokens"] == len(hf.image_features(image, PruMergeConfig()))
    assert record["grid"] == 27 and len(record["roles"]) == 729
    assert record["importance"] == "received attention"
    with Image.open(out / "wide.tokens.png") as png:
        assert png.format == "PNG" and png.size == (1600, 580)
    refused = run_example(
        "visualize.py", *args, "--option", "importance=cls", family_inputs[0], env=env
    )
    assert refused.returncode == 2 and "CLS" in refused.stderr


@pytest.mark.script
def test_visualize_histogram_sums_llava_next_crops_and_quotes_the_stock_count(
    next_checkpoint, family_inputs, tmp_path
):
    from tests.hf_reference import HFPruMergeLlava

    env = tiny_cache_env(next_checkpoint, tmp_path)
    folder = family_inputs[0].parent
    png = tmp_path / "hist.png"
    args = ["histogram", "--tiny", "--family", "llava_next", "--modes", "prumerge", "off"]
    done = run_example("visualize.py", *args, "--out", png, folder, env=env)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in png.with_suffix(".jsonl").read_text().splitlines()]
    hf = HFPruMergeLlava(next_checkpoint)
    assert sorted(Path(r["image"]).name for r in records) == ["tall.png", "wide.png"]
    for record in records:
        image = Image.open(record["image"]).convert("RGB")
        ids = hf.processor(images=[image], text="<image>", return_tensors="pt").input_ids[0]
        assert record["tokens"] == {
            "prumerge": len(hf.image_features(image, PruMergeConfig())),
            "off": int((ids == hf.image_token).sum()),
        }


@pytest.mark.script
def test_visualize_refuses_family_with_a_model_path(tmp_path):
    done = run_example(
        "visualize.py", "tokens", "--model", str(tmp_path), "--family", "siglip", tmp_path
    )
    assert done.returncode == 2 and "--family applies to --tiny" in done.stderr


# --- videos: a filmstrip, one column per frame, each frame reduced on its own -----------------


@pytest.mark.parametrize("mode", ["prumerge+", "off"])
def test_filmstrip_draws_each_frames_kept_patches_and_the_video_total(mode):
    frames = 4
    reduced = reduce_tokens(*synthetic_batch(batch=frames), PruMergeConfig(mode=mode))
    tmaps = [vis.token_map(reduced, t) for t in range(frames)]
    pictures = [Image.new("RGB", (336, 336), (30 * t, 90, 200)) for t in range(frames)]
    fig = vis.draw_filmstrip(pictures, tmaps, title="clip", stock_tokens=576)
    kept_row, merge_row = fig.axes[:frames], fig.axes[frames : 2 * frames]
    assert len(fig.axes) == 2 * frames  # one column per frame, no colour bars
    for t, (kept, merge) in enumerate(zip(kept_row, merge_row, strict=True)):
        outliers = int(reduced.num_outliers[t])
        samples = reduced.host_num_kept[t] - outliers
        assert _rectangles(kept, "red") == outliers
        assert _rectangles(kept, "cyan") == (0 if mode == "off" else samples)  # off: none marked
        assert kept.get_xlim() == (0, 24) and merge.get_xlim() == (0, 24)
        if mode == "off":
            assert kept.get_title() == f"frame {t}: 576 patches (off)"
        else:
            assert kept.get_title() == (
                f"frame {t}: {outliers} + {samples} + 1 = {reduced.host_lengths[t]}"
            )
    if mode == "off":
        assert fig.get_suptitle() == "clip: mode off: 4 frames passed through = 576 tokens stock"
    else:
        outliers = sum(int(n) for n in reduced.num_outliers)
        assert fig.get_suptitle() == (
            f"clip: {frames} frames: {outliers} outliers + "
            f"{sum(reduced.host_num_kept) - outliers} samples + "
            f"{frames} extra = {sum(reduced.host_lengths)} tokens (stock: 576)"
        )
    with pytest.raises(ValueError, match="one token map per frame"):
        vis.draw_filmstrip(pictures[:2], tmaps)


@pytest.fixture(scope="module")
def next_video_checkpoint(tmp_path_factory) -> str:
    from tests.helpers import family_checkpoint

    return family_checkpoint("next_video", tmp_path_factory)


@pytest.mark.script
def test_visualize_tokens_draws_a_video_as_a_filmstrip(next_video_checkpoint, tiny_llava, tmp_path):
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from tests.hf_reference import HFPruMergeLlava

    env = tiny_cache_env(next_video_checkpoint, tmp_path)
    inputs = tmp_path / "inputs"
    done = run_example("make_inputs.py", inputs, "--images", 0, "--video", 6, env=env)
    assert done.returncode == 0, done.stderr
    # The same clip as a folder of PNG frames (lossless): frames 0, 2, 5 of 6 are what an even
    # spread of 3 picks, as vLLM's loader picks them.
    from vllm_prumerge.testing import make_video

    clip = make_video(0, 6)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"f{t}.png")
    out = tmp_path / "vis"
    args = ["tokens", "--tiny", "--family", "next_video", "--video", "--frames", 3]
    done = run_example(
        "visualize.py", *args, "--mode", "prumerge+", "--out-dir", out,
        inputs / "video.mp4", folder, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loader = VIDEO_LOADER_REGISTRY.load("opencv")  # vLLM's own decoder of video_url MP4s
    decoded, _ = loader.load_bytes((inputs / "video.mp4").read_bytes(), num_frames=3)
    hf = HFPruMergeLlava(next_video_checkpoint)
    config = PruMergeConfig(mode="prumerge+")
    for name, video in (("video", decoded), ("frames", clip[[0, 2, 5]])):
        record = json.loads((out / f"{name}.tokens.json").read_text())
        frames = hf.video_frames(video)  # transformers' video processor: [3, 3, 336, 336]
        expected = [len(hf._reduce_crops(f[None], config)) for f in frames]
        assert [m["tokens"] for m in record["frame_maps"]] == expected
        assert record["frames"] == 3 and record["tokens"] == sum(expected)
        for m in record["frame_maps"]:
            assert m["tokens"] == m["outliers"] + m["samples"] + 1
            assert len(m["roles"]) == 576
        ids = hf.processor(videos=[video], text="<video>", return_tensors="pt").input_ids[0]
        assert record["stock_tokens"] == int((ids == hf.video_token).sum()) == 3 * 144
        shown = "video.mp4" if name == "video" else "frames"
        assert f"{shown}: {sum(expected)} tokens over 3 frames (stock 432;" in done.stdout
        with Image.open(out / f"{name}.tokens.png") as png:
            assert png.format == "PNG" and png.size == (780, 640)
    assert "2 filmstrip(s)" in done.stdout
    # Across time: frames A, A, B (a cut); the repeated frame's patches are drawn as unchanged,
    # as many per frame as the reference's own adaptive loop drops.
    from tests.hf_reference import reference_retention

    cut = tmp_path / "cut"
    cut.mkdir()
    for t, frame in enumerate(make_video(0, 3, kind="cut")):
        Image.fromarray(frame).save(cut / f"f{t}.png")
    temporal = PruMergeConfig(mode="prumerge+", temporal="adaptive")
    done = run_example(
        "visualize.py", *args, "--mode", "prumerge+", "--option", "temporal=adaptive",
        "--out-dir", out, cut, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "cut.tokens.json").read_text())
    clip = make_video(0, 3, kind="cut")
    retained = reference_retention(hf.video_patch_features(clip), temporal)
    assert [m["unchanged"] for m in record["frame_maps"]] == (~retained).sum(1).tolist()
    assert record["frame_maps"][1]["unchanged"] == 576  # the repeated frame: nothing new
    assert record["frame_maps"][1]["tokens"] == 0
    assert record["tokens"] == len(hf.frame_features(hf.video_frames(clip), temporal))
    env = tiny_cache_env(tiny_llava, tmp_path)  # LLaVA-1.5 takes no videos
    refused = run_example(
        "visualize.py", "tokens", "--tiny", "--video", "--out-dir", out, folder, env=env
    )
    assert refused.returncode == 2 and "takes no videos" in refused.stderr
