"""The benchmark scripts end to end on tiny workloads: they run, and their figures are consistent.

Each script runs as a user would run it (a subprocess, on a generated checkpoint; the serving
script against the session's servers, `--base-url`, tests/conftest.py) and the test reads what it
wrote: the JSON's token counts are the real ones (stock = 576 per image; fixed budgets = budget +
1, PruMerge's equal the core encoder's; videos (`--frames`, offline on LLaVA-OneVision, through
`video_url` on Video-LLaVA): stock = transformers' own processor's count, reduced = the
independent transformers pipeline's per-frame reduction of the frames the engine saw),
text-equivalent requests have exactly their image (or video) requests' prompt length, ratios
follow from the figures, and the Markdown tables and PNG plots exist. Never timing.
"""

from __future__ import annotations

import base64
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from tests.helpers import cpu_env, encoder_counts, family_checkpoint, run_python

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The scripts' own modules (`_common`, `serving`), importable by the tests that read them.
sys.path.insert(0, str(BENCH))


def run_script(args: list, timeout: float = 600, in_process: bool = False):
    """Run a benchmark script; `in_process`: its vLLM engine inside the script's process (no
    engine-core or worker spawn, as tests/helpers.py `in_process_engine`)."""
    return run_python(args, env=cpu_env(in_process), timeout=timeout)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


@pytest.fixture(scope="module")
def onevision(tmp_path_factory) -> str:
    """The session's generated tiny LLaVA-OneVision checkpoint."""
    return family_checkpoint("onevision", tmp_path_factory)


def stock_video_tokens(checkpoint: str, video) -> int:
    """Visual tokens of one video (`[T, H, W, 3]`) by transformers' own processor (independent
    of vLLM and of the plugin): the count of the video token in the expanded prompt."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    ids = processor(videos=[video], text="USER: <video>\nWhat? ASSISTANT:")["input_ids"][0]
    return list(ids).count(AutoConfig.from_pretrained(checkpoint).video_token_index)


def per_frame_tokens(hf, video) -> list[int]:
    """Tokens of each frame of `video` reduced on its own (kept + 1) by the independent
    transformers pipeline (tests/hf_reference.py), frames from the family's video processor."""
    from vllm_prumerge import PruMergeConfig

    return [len(hf.frame_features(f[None], PruMergeConfig())) for f in hf.video_frames(video)]


def test_configuration_strings_parse_to_request_options():
    from _common import parse_configs

    configs = parse_configs("off, prumerge+ ,fixed:64,fixed:0.25,fixed:32s")
    assert [c.name for c in configs] == ["off", "prumerge+", "fixed-64", "fixed-0.25", "fixed-32+s"]
    assert configs[2].prumerge == {"mode": "fixed", "budget": 64}
    assert configs[3].prumerge == {"mode": "fixed", "budget_ratio": 0.25}
    assert configs[4].prumerge == {"mode": "fixed", "budget": 32, "spatial_samples": True}
    for bad in ("fixed:lots", "prune", "off,off", ""):
        with pytest.raises(ValueError):
            parse_configs(bad)
    # Across time: a reducing configuration, then /evs[:RATE] or /adaptive[:THRESHOLD].
    evs, adaptive = parse_configs("prumerge/evs:0.5, fixed:16s/adaptive")
    assert (evs.name, adaptive.name) == ("prumerge/evs:0.5", "fixed-16+s/adaptive")
    assert evs.prumerge == {"mode": "prumerge", "temporal": "evs", "temporal_rate": 0.5}
    assert adaptive.prumerge == {
        "mode": "fixed", "budget": 16, "spatial_samples": True, "temporal": "adaptive"
    }  # fmt: skip
    for bad in ("off/adaptive", "prumerge/sometimes", "prumerge/evs:most", "prumerge/evs:1.5"):
        with pytest.raises(ValueError):
            parse_configs(bad)


def test_generated_video_kinds_hold_cut_and_pan_where_they_say():
    import numpy as np

    from vllm_prumerge.testing import make_scene, make_video

    first, second = (np.asarray(make_scene(s, size=(64, 48))) for s in (7, 8))
    static = make_video(7, 4, size=(64, 48), kind="static")
    assert static.shape == (4, 48, 64, 3) and all((f == first).all() for f in static)
    cut = make_video(7, 5, size=(64, 48), kind="cut")  # 3 frames before the cut, 2 after
    assert [(f == first).all() for f in cut] == [True, True, True, False, False]
    assert all((f == second).all() for f in cut[3:])
    panning = make_video(7, 3, size=(64, 48), pan=5)
    assert (panning[1][:, :-5] == panning[0][:, 5:]).all()  # the scene moved 5 px left
    assert not (panning[1] == panning[0]).all()
    with pytest.raises(ValueError, match="video kind"):
        make_video(7, 2, kind="zoom")


@pytest.mark.engine
def test_throughput_script_reports_real_token_counts_and_consistent_ratios(tiny_llava, tmp_path):
    out = tmp_path / "throughput"
    num_prompts, output_len = 4, 3
    run_script(
        [
            BENCH / "throughput.py",
            "--model", tiny_llava,
            "--dtype", "float32",
            "--num-prompts", num_prompts,
            "--output-len", output_len,
            "--configs", "off,prumerge,fixed:64",
            "--warmup", 1,
            "--repeats", 1,
            "--kv-cache-tokens", 4096,
            "--max-num-seqs", 8,
            "--no-progress",
            "--out", out,
        ],
        in_process=True,
    )  # fmt: skip
    data = json.loads((out / "throughput.json").read_text())
    by_name = {r["name"]: r for r in data["results"]}
    assert list(by_name) == ["off", "prumerge", "fixed-64"]
    assert data["baseline"] == "off"
    off, prumerge, fixed = by_name["off"], by_name["prumerge"], by_name["fixed-64"]

    assert off["visual_tokens_per_request"] == [576] * num_prompts
    assert fixed["visual_tokens_per_request"] == [65] * num_prompts
    assert prumerge["visual_tokens"]["mean"] < 576
    assert all(2 <= n <= 577 for n in prumerge["visual_tokens_per_request"])

    # The counts are the core encoder's, on the same (regenerated) images.
    from vllm_prumerge import PruMergeConfig
    from vllm_prumerge.testing.workload import build_workload

    items = build_workload(num_prompts, data["settings"]["seed"])
    expected = encoder_counts(tiny_llava, [item.image for item in items], PruMergeConfig())
    assert prumerge["visual_tokens_per_request"] == expected

    # Same questions in every configuration: prompt tokens differ by the visual tokens only.
    for r in (prumerge, fixed):
        text_tokens = r["prompt_tokens"]["mean"] - r["visual_tokens"]["mean"]
        assert text_tokens == pytest.approx(off["prompt_tokens"]["mean"] - 576)
        ideal = off["prompt_tokens"]["mean"] / r["prompt_tokens"]["mean"]
        assert r["ideal_ratio_to_baseline"]["requests_per_s"] == pytest.approx(ideal)
        measured = r["engine"]["requests_per_s"] / off["engine"]["requests_per_s"]
        assert r["ratio_to_baseline"]["engine"]["requests_per_s"] == pytest.approx(measured)
        assert r["fraction_of_ideal"]["engine"] == pytest.approx(measured / ideal)
    for r in data["results"]:
        assert r["output_tokens"]["min"] == r["output_tokens"]["max"] == output_len
        for phase in ("engine", "end_to_end"):
            assert r[phase]["requests_per_s"] > 0
            assert 0 < r[phase]["peak_kv_cache_usage"] <= 1
            assert 1 <= r[phase]["max_generating_requests"] <= num_prompts
        assert r["frontend_ms_per_image"] > 0
    # 4 x 641 tokens need more KV blocks than 4 x 130: the cache shows it.
    assert off["engine"]["peak_kv_cache_usage"] > fixed["engine"]["peak_kv_cache_usage"]

    # Text-equivalents: the same prompt lengths (the script checks it per request), text only.
    for r in data["results"]:
        assert r["text"]["prompt_tokens"] == r["prompt_tokens"]
        (run,) = r["runs"]
        for phase in ("engine", "end_to_end"):
            assert r["text"][phase]["requests_per_s"] > 0
            assert r["fraction_of_text"][phase] == pytest.approx(
                run[phase]["requests_per_s"] / run["text"][phase]["requests_per_s"]
            )

    report = (out / "throughput.md").read_text()
    assert "| config | engine req/s |" in report and "| prumerge |" in report
    assert "## Against the true limit" in report
    assert_png(out / "throughput_vs_tokens.png")
    assert_png(out / "scaling.png")
    assert_png(out / "visual_tokens_hist.png")
    assert data["environment"]["versions"]["torch"]


@pytest.mark.engine
def test_throughput_script_sends_videos_and_counts_every_frame(onevision, tmp_path):
    checkpoint = onevision
    out = tmp_path / "video"
    num_prompts, frames = 2, 3
    run_script(
        [
            BENCH / "throughput.py",
            "--model", checkpoint,
            "--dtype", "float32",
            "--frames", frames,
            "--num-prompts", num_prompts,
            "--output-len", 2,
            "--video-kind", "cut",
            "--configs", "off,prumerge,prumerge/adaptive",
            "--warmup", 0,
            "--repeats", 1,
            "--max-model-len", 4096,
            "--kv-cache-tokens", 8192,
            "--max-num-seqs", 4,
            "--no-progress",
            "--no-plots",
            "--out", out,
        ],
        in_process=True,
    )  # fmt: skip
    data = json.loads((out / "throughput.json").read_text())
    off, prumerge, adaptive = data["results"]
    # The generated template writes video parts: vLLM's default content format.
    assert data["media"] == {
        "modality": "video", "frames": frames, "video_kind": "cut", "chat_content_format": "openai"
    }  # fmt: skip
    from tests.hf_reference import HFPruMergeLlava
    from vllm_prumerge.testing import make_video
    from vllm_prumerge.testing.workload import build_workload

    seed = data["settings"]["seed"]
    items = build_workload(num_prompts, seed, frames=frames, video_kind="cut")
    for i, item in enumerate(items):  # A, A, B; the workload's seeding: seed * 100_003 + i
        assert (item.video == make_video(seed * 100_003 + i, frames, kind="cut")).all()
    # Stock: transformers' own processor (OneVision: 196 per frame + 1 newline per video).
    expected = [stock_video_tokens(checkpoint, item.video) for item in items]
    assert off["visual_tokens_per_request"] == expected == [frames * 196 + 1] * num_prompts
    # Reduced: each frame reduced on its own by the independent transformers pipeline.
    hf = HFPruMergeLlava(checkpoint)
    per_frame = [per_frame_tokens(hf, item.video) for item in items]
    assert all(len(counts) == frames and min(counts) >= 2 for counts in per_frame)
    assert prumerge["visual_tokens_per_request"] == [sum(counts) for counts in per_frame]
    # Across time: the transformers pipeline with the reference's own adaptive loop (float64).
    from vllm_prumerge import PruMergeConfig

    temporal = PruMergeConfig(temporal="adaptive")
    expected = [len(hf.frame_features(hf.video_frames(item.video), temporal)) for item in items]
    assert adaptive["visual_tokens_per_request"] == expected
    # Same questions: prompt tokens differ by the visual tokens only; text-equivalents match.
    text_tokens = off["prompt_tokens"]["mean"] - off["visual_tokens"]["mean"]
    assert prumerge["prompt_tokens"]["mean"] - prumerge["visual_tokens"]["mean"] == text_tokens
    for r in data["results"]:
        assert r["text"]["prompt_tokens"] == r["prompt_tokens"]
        assert r["engine"]["requests_per_s"] > 0 and r["text"]["engine"]["requests_per_s"] > 0
    report = (out / "throughput.md").read_text()
    assert f"one cut video of {frames} frames" in report and "| visual tok/video |" in report


@pytest.mark.server
def test_serving_script_sends_videos_as_video_urls(video_server, video_llava_checkpoint, tmp_path):
    checkpoint = video_llava_checkpoint
    out = tmp_path / "video"
    num_prompts, frames = 2, 3
    run_script(
        [
            BENCH / "serving.py",
            "--base-url", video_server[0],
            "--frames", frames,
            "--image-size", "320x240",
            "--configs", "off,prumerge",
            "--num-prompts", num_prompts,
            "--output-len", 2,
            "--warmup", 0,
            "--repeats", 1,
            "--no-progress",
            "--no-plots",
            "--out", out,
        ]
    )  # fmt: skip
    data = json.loads((out / "serving.json").read_text())
    off, prumerge = data["runs"]
    for r in (off, prumerge):
        assert r["completed"] == num_prompts and r["failed"] == 0
        assert r["visual_images"] == num_prompts  # the per-video histogram saw every video
        assert r["text"]["prompt_tokens"] == r["prompt_tokens"]  # text-equivalents match

    # What the server decoded: the same MP4s through vLLM's own video loader (lossy codec).
    from serving import media_url
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from tests.hf_reference import HFPruMergeVideoLlava
    from vllm_prumerge.testing.workload import build_workload

    loader = VIDEO_LOADER_REGISTRY.load("opencv")
    items = build_workload(num_prompts, data["settings"]["seed"], size=(320, 240), frames=frames)
    decoded = []
    for item in items:
        payload = base64.b64decode(media_url(item).split(",", 1)[1])
        decoded.append(loader.load_bytes(payload, num_frames=frames)[0])
    assert all(video.shape == (frames, 240, 320, 3) for video in decoded)
    # Stock: transformers' own processor (Video-LLaVA: 257 per frame, CLS kept).
    stock = [stock_video_tokens(checkpoint, video) for video in decoded]
    assert off["visual_tokens_mean"] == stock[0] == stock[1] == frames * 257
    # Reduced: each decoded frame reduced on its own by the independent transformers pipeline.
    hf = HFPruMergeVideoLlava(checkpoint)
    reduced = [sum(per_frame_tokens(hf, video)) for video in decoded]
    assert prumerge["visual_tokens_mean"] == pytest.approx(sum(reduced) / num_prompts)
    # usage.prompt_tokens: one <video> placeholder expanded, the rest the chat message's text.
    assert off["prompt_tokens"]["mean"] - prumerge["prompt_tokens"]["mean"] == pytest.approx(
        off["visual_tokens_mean"] - prumerge["visual_tokens_mean"]
    )
    report = (out / "serving.md").read_text()
    assert "| visual tok/video |" in report and "MP4 `video_url`" in report


@pytest.mark.server
def test_serving_script_measures_latency_against_text(llava_server, tiny_llava, tmp_path):
    out = tmp_path / "serving"
    num_prompts, output_len = 3, 3
    run_script(
        [
            BENCH / "serving.py",
            "--base-url", llava_server[0],
            "--configs", "off,prumerge",
            "--num-prompts", num_prompts,
            "--output-len", output_len,
            "--warmup", 0,
            "--repeats", 1,
            "--max-concurrency", 2,
            "--no-progress",
            "--out", out,
        ]
    )  # fmt: skip
    data = json.loads((out / "serving.json").read_text())
    off, prumerge = data["runs"]
    assert (off["name"], prumerge["name"]) == ("off", "prumerge")
    assert data["servers"] == {"plugin": f"given ({llava_server[0]})"}
    for r in data["runs"]:
        assert r["completed"] == num_prompts and r["failed"] == 0
        assert r["output_tokens"]["min"] == r["output_tokens"]["max"] == output_len
        assert 0 < r["ttft_ms"]["p50"] <= r["e2el_ms"]["p50"]
        assert r["tpot_ms"]["p50"] > 0 and r["requests_per_s"] > 0
        # The text-equivalent requests have exactly the image requests' prompt lengths.
        text = r["text"]
        assert text["completed"] == num_prompts and text["failed"] == 0
        assert text["prompt_tokens"] == r["prompt_tokens"]
        assert r["fraction_of_text"]["requests_per_s"] == pytest.approx(
            r["requests_per_s"] / text["requests_per_s"]
        )
        assert r["visual_images"] == num_prompts  # the server's histogram saw every image
    # `off` gives stock's 576 per image; PruMerge's counts are the core encoder's.
    from vllm_prumerge import PruMergeConfig
    from vllm_prumerge.testing.workload import build_workload

    items = build_workload(num_prompts, data["settings"]["seed"])
    counts = encoder_counts(tiny_llava, [item.image for item in items], PruMergeConfig())
    assert off["visual_tokens_mean"] == 576
    assert prumerge["visual_tokens_mean"] == pytest.approx(statistics.mean(counts))
    # usage.prompt_tokens differs by exactly the visual tokens (same questions).
    assert off["prompt_tokens"]["mean"] - prumerge["prompt_tokens"]["mean"] == pytest.approx(
        576 - prumerge["visual_tokens_mean"]
    )
    assert prumerge["ratio_to_baseline"]["requests_per_s"] == pytest.approx(
        prumerge["requests_per_s"] / off["requests_per_s"]
    )
    report = (out / "serving.md").read_text()
    assert "| prumerge |" in report and "## Against the true limit" in report
    assert_png(out / "serving_latency.png")


@pytest.mark.script
def test_frontend_script_breaks_down_the_plugins_and_stock_front_end(tiny_llava, tmp_path):
    out = tmp_path / "frontend"
    num_images = 2
    run_script(
        [
            BENCH / "frontend.py",
            "--model", tiny_llava,
            "--dtype", "float32",
            "--num-images", num_images,
            "--threads", "1,2",
            "--modes", "off,prumerge",
            "--warmup", 0,
            "--no-progress",
            "--out", out,
        ],
        timeout=300,
    )  # fmt: skip
    data = json.loads((out / "frontend.json").read_text())
    rows = {(r["name"], r["threads"]): r for r in data["results"]}
    assert set(rows) == {(n, t) for n in ("stock", "off", "prumerge") for t in (1, 2)}
    for (name, _), r in rows.items():
        assert len(r["per_image"]) == num_images
        for stage in ("decode", "image_processor", "tower", "handoff", "vllm_processor"):
            assert r["ms"][stage]["min"] > 0, (name, stage)
        assert (r["ms"]["reduction"]["max"] == 0) == (name == "stock")
    # Counts: stock vLLM's and `off` are 576; PruMerge's are the core encoder's.
    for threads in (1, 2):
        assert [i["visual_tokens"] for i in rows[("stock", threads)]["per_image"]] == [576] * 2
        assert [i["visual_tokens"] for i in rows[("off", threads)]["per_image"]] == [576] * 2
    from vllm_prumerge import PruMergeConfig
    from vllm_prumerge.testing.workload import build_workload

    items = build_workload(num_images, data["settings"]["seed"])
    expected = encoder_counts(tiny_llava, [item.image for item in items], PruMergeConfig())
    assert [i["visual_tokens"] for i in rows[("prumerge", 1)]["per_image"]] == expected
    # What crosses to the engine: stock's pixel values (3 x 336 x 336 float32) outweigh the
    # reduced features (a few 64-wide rows).
    assert rows[("stock", 1)]["handoff_bytes"]["min"] >= 3 * 336 * 336 * 4
    assert rows[("prumerge", 1)]["handoff_bytes"]["max"] < rows[("off", 1)]["handoff_bytes"]["min"]
    report = (out / "frontend.md").read_text()
    assert "| prumerge | 1 |" in report
    # The machine is named with its native half-precision paths, in the JSON and the report.
    from vllm_prumerge.vision.precision import cpu_description

    assert data["environment"]["cpu_line"] == cpu_description()
    assert cpu_description() in report
    assert data["tower_dtype"].startswith("float32 (tower_dtype=auto: the model dtype)")


@pytest.mark.script
def test_prefill_script_runs_at_a_tiny_shape_on_cpu_without_vllm(tmp_path):
    out = tmp_path / "prefill"
    visual = [576, 145, 33]
    text_tokens = 16
    runner = (
        "import runpy, sys; sys.modules['vllm'] = None; "  # any `import vllm` now fails
        "sys.argv = sys.argv[1:]; sys.path.insert(0, str(sys.argv[0]).rpartition('/')[0]); "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    run_script(
        [
            "-c", runner, BENCH / "prefill_transformers.py",
            "--shape", "tiny",
            "--device", "cpu",
            "--visual-tokens", ",".join(map(str, visual)),
            "--text-tokens", text_tokens,
            "--frontend-batch-sizes", "1,2",
            "--warmup", 0,
            "--iters", 1,
            "--no-progress",
            "--out", out,
        ],
        timeout=300,
    )  # fmt: skip
    data = json.loads((out / "prefill.json").read_text())
    shape = data["shape"]
    assert [r["visual_tokens"] for r in data["prefill"]] == visual
    for r in data["prefill"]:
        assert r["prompt_tokens"] == r["visual_tokens"] + text_tokens
        assert r["latency_ms"]["median"] > 0
        # float32 keys and values of every layer for every prompt token
        assert r["kv_cache_bytes"] == 2 * shape["layers"] * r["prompt_tokens"] * (
            shape["hidden_size"] * 4
        )
    rows = {(r["batch_size"], r["mode"]): r for r in data["frontend"]}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("off", "prumerge", "prumerge+")}
    for (batch, mode), r in rows.items():
        assert len(r["visual_tokens_per_image"]) == batch
        assert r["per_image_ms"]["median"] > 0
        if mode == "off":
            assert r["visual_tokens_per_image"] == [576] * batch
        else:
            assert all(2 <= n <= 577 for n in r["visual_tokens_per_image"])
    # Per-image statistics: image 0's count does not depend on the batch.
    assert (
        rows[(1, "prumerge")]["visual_tokens_per_image"][0]
        == (rows[(2, "prumerge")]["visual_tokens_per_image"][0])
    )
    assert "## LLM prefill" in (out / "prefill.md").read_text()
    assert_png(out / "prefill.png")


@pytest.mark.script
def test_reduction_benchmark_times_both_paths_and_its_speedups_follow_from_them(tmp_path):
    """bench_reduction.py (default measurement, no tower) times the batched reduction and the
    naive transcription; each speed-up is the ratio of their minima, skipped rows say so."""
    out = tmp_path / "reduction.json"
    run_script(
        [
            BENCH / "bench_reduction.py", "--batch-sizes", "1,2", "--patches", "576",
            "--width", 64, "--repeats", 1, "--naive-repeats", 1, "--naive-max-patches", 576,
            "--tower-batch-sizes", "", "--out", out,
        ]
    )  # fmt: skip
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["batch"]): r for r in data["reduction"]}
    assert set(rows) == {(m, b) for m in ("prumerge", "prumerge+") for b in (1, 2)}
    for (_, batch), r in rows.items():
        assert r["min_kept"] <= r["mean_kept"] <= r["max_kept"] <= 576
        if batch == 1:
            assert r["speedup"] == r["naive"]["min_s"] / r["fast"]["min_s"]
        else:  # B * N above --naive-max-patches
            assert r["naive"] is None and r["speedup"] is None
    assert data["tower"] == [] and data["environment"]["dtype"] == "float32"
    assert data["markdown"].count("not measured") == 2


@pytest.mark.script
def test_tower_memory_reports_weights_and_a_peak_per_batch_size(tmp_path):
    """`bench_reduction.py memory` on a tiny tower: exact weight bytes, one peak per batch size
    and the per-image slope through them."""
    out = tmp_path / "memory.json"
    run_script(
        [BENCH / "bench_reduction.py", "memory", "--tower", "tiny", "--dtypes", "float32",
         "--batch-sizes", "1,2", "--repeats", 1, "--out", out]
    )  # fmt: skip
    (result,) = json.loads(out.read_text())["results"]
    assert result["param_bytes"] == 4 * result["param_count"]
    peaks = result["forward_peak_extra_bytes"]
    assert set(peaks) == {"1", "2"}
    assert result["activation_bytes_per_image"] == peaks["2"] - peaks["1"]


def test_a_chat_template_that_drops_videos_falls_back_to_the_string_format(onevision, tmp_path):
    """Video requests on a checkpoint whose template writes no video part (an image-only
    template): vLLM's "string" content format, whose prompt still carries the `<video>`."""
    from _common import chat_prompt

    from vllm_prumerge.testing.checkpoint import CHAT_TEMPLATE

    checkpoint = onevision
    assert chat_prompt(checkpoint, frames=3).content_format == "openai"
    assert chat_prompt(checkpoint, frames=0).content_format == "openai"
    image_only = tmp_path / "image-only-template"
    shutil.copytree(checkpoint, image_only)
    (image_only / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert chat_prompt(str(image_only), frames=3).content_format == "string"
    assert chat_prompt(str(image_only), frames=0).content_format == "openai"
