"""`benchmarks/quality.py`: scoring worked by hand, input errors, and the script end to end.

The end-to-end runs use the session's generated checkpoint (random weights: the accuracy is
meaningless, so the tests pin the report's structure, that `off` agrees with itself and with a
second, separately run `off` configuration, and that the visual-token counts equal the core
encoder's counts on the same images, computed independently of vLLM). The server test runs the
same set through a real `vllm serve --plugin prumerge` and checks the server's counts
(usage.prompt_tokens minus the prompt's text tokens) against the same independent counts. The
video runs (real MP4 files, generated Video-LLaVA, per frame and across time) check every
video's count against transformers' video tower and the reduction core (tests/hf_reference.py)
on the frames sampled independently of vLLM (`read_video`), offline and on the session's video
server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_cache_env
from tests.helpers import encoder_counts, run_python

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG_NAMES = ["off", "prumerge", "prumerge+", "fixed-64", "off-again"]
CONFIG_ARGS = ["--budgets", "64", "--config", 'off-again={"mode": "off"}']

sys.path.insert(0, str(BENCH))


def quality():
    import quality as module

    return module


# --- scoring, by hand ---------------------------------------------------------------------------


def test_scores_follow_the_vqa_rules_and_compare_each_item_with_off():
    q = quality()
    from _common import BenchConfig

    items = [
        q.Item("a.png", "How many?", ("2",) * 4 + ("3",) * 6),
        q.Item("b.png", "Is it?", ("yes",) * 10),
        q.Item("c.png", "Colour?", None),  # agreement only
    ]
    configs = [BenchConfig("off", "off"), BenchConfig("x", {"mode": "fixed", "budget": 9})]
    answers = {
        "off": [
            q.Answer("Two", 576, 600, 1),
            q.Answer("Yes.", 576, 590, 2),
            q.Answer("red", 576, 595, 1),
        ],
        "x": [
            q.Answer("2 apples", 10, 34, 2),
            q.Answer("yes", 20, 34, 1),
            q.Answer("Red!", 60, 79, 1),
        ],
    }
    results, records = q.score(items, configs, answers, {"off": 1.5, "x": 0.5}, False)
    off, x = results
    # off: "Two" -> "2" matches 4 annotators -> 1.0; "Yes." -> "yes" -> 1.0.
    assert off["vqa_accuracy"] == pytest.approx(1.0)
    assert off["agreement_with_off"] == 1.0
    # x: "2 apples" matches nobody -> 0; "yes" -> 1 (the unlabelled item does not count).
    assert x["labelled"] == 2 and x["items"] == 3
    assert x["vqa_accuracy"] == pytest.approx(0.5)
    assert x["exact_match"] == pytest.approx(0.5)
    # Agreement on all three items: "2 apples" != "2", "yes" == "yes", "red" == "red".
    assert x["agreement_with_off"] == pytest.approx(2 / 3)
    # Per-item differences -1, 0: mean -0.5, sample sd sqrt(0.5), se 0.5, half-width 0.98.
    delta = x["vqa_accuracy_delta_vs_off"]
    assert delta["mean"] == pytest.approx(-0.5)
    assert (delta["ci95_low"], delta["ci95_high"]) == pytest.approx((-1.48, 0.48))
    # Visual tokens 10, 20, 60: mean 30, p50 20, p95 20 + 0.9 * 40 = 56.
    assert x["visual_tokens"]["mean"] == 30 and x["visual_tokens"]["p50"] == 20
    assert x["visual_tokens"]["p95"] == pytest.approx(56)
    assert x["visual_tokens_ratio_to_off"] == pytest.approx(30 / 576)
    assert (off["requests_per_s"], x["requests_per_s"]) == (2.0, 6.0)
    assert x["requests_per_s_ratio_to_off"] == pytest.approx(3.0)
    assert records[0]["predictions"]["x"] == {
        "answer": "2 apples",
        "visual_tokens": 10,
        "agrees_with_off": False,
        "vqa_accuracy": 0.0,
    }
    assert records[2]["answers"] is None and records[2]["predictions"]["x"]["vqa_accuracy"] is None


def test_reference_normalisation_is_an_option():
    q = quality()
    from _common import BenchConfig

    items = [q.Item("a.png", "How many?", ("Two",) * 4)]
    answers = {"off": [q.Answer("two", 576, 600, 1)]}
    for normalize, expected in ((False, 0.0), (True, 1.0)):
        (result,), _ = q.score(items, [BenchConfig("off", "off")], answers, {"off": 1.0}, normalize)
        assert result["vqa_accuracy"] == expected


def test_configurations_put_off_first_then_named_budgets_and_option_sets():
    q = quality()
    argv = ["--tiny", "--data", "x.jsonl", "--configs", "prumerge+,off", "--budgets", "32,0.5"]
    argv += ["--config", 'k8={"mode": "prumerge", "k_neighbors": 8}']
    args = q.build_parser().parse_args(argv)
    configs = q.build_configs(args)
    assert [c.name for c in configs] == ["off", "prumerge+", "fixed-32", "fixed-0.5", "k8"]
    assert configs[2].prumerge == {"mode": "fixed", "budget": 32}
    assert configs[4].prumerge == {"mode": "prumerge", "k_neighbors": 8}


def test_a_folder_and_a_question_file_ask_every_question_of_every_image(tmp_path):
    from PIL import Image

    q = quality()
    for name in ("b.png", "a.jpg", "notes.txt"):
        if name.endswith("txt"):
            (tmp_path / name).write_text("not an image")
        else:
            Image.new("RGB", (8, 8)).save(tmp_path / name)
    questions = tmp_path / "q.txt"
    questions.write_text("What is it?\n\n# a comment\nWhere is it?\n")
    items = q.load_folder(str(tmp_path), str(questions))
    assert [(Path(i.source).name, i.question) for i in items] == [
        ("a.jpg", "What is it?"),
        ("a.jpg", "Where is it?"),
        ("b.png", "What is it?"),
        ("b.png", "Where is it?"),
    ]
    assert all(i.answers is None for i in items)


# --- input errors, before any engine starts -------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "args", "message"),
    [
        (None, ["--tiny"], "exactly one of --data"),
        ([{"image": "a.png", "question": "q?", "answers": ["x"]}], [], "one of --model"),
        ([{"image": "missing.png", "question": "q?"}], ["--tiny"], "image not found"),
        ([{"image": "a.png"}], ["--tiny"], "set.jsonl:1: 'question'"),
        ([{"image": "a.png", "question": "q?", "answers": "x"}], ["--tiny"], "non-empty list"),
        ([{"image": "a.png", "question": "q?"}], ["--tiny", "--config", "k={bad"], "not JSON"),
        (
            [{"image": "a.png", "question": "q?"}],
            ["--tiny", "--config", 'k={"mode": "prumerge", "iqr": 2}'],
            "iqr",
        ),
        ([{"image": "a.png", "question": "q?"}], ["--tiny", "--budgets", "lots"], "bad fixed"),
        ([{"image": "a.png", "question": "q?"}], ["--tiny", "--max-tokens", "0"], ">= 1"),
        ([{"video": "gone.mp4", "question": "q?"}], ["--tiny"], "video not found"),
        (
            [{"image": "a.png", "question": "q?"}, {"video": "a.png", "question": "q?"}],
            ["--tiny"],
            "mixes images and videos",
        ),
        ([{"video": "a.png", "question": "q?"}], ["--tiny", "--frames", "0"], "--frames must"),
    ],
)
def test_bad_input_is_refused_with_a_message(tmp_path, capsys, lines, args, message):
    from PIL import Image

    q = quality()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = []
    if lines is not None:
        (tmp_path / "set.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        data = ["--data", str(tmp_path / "set.jsonl")]
    with pytest.raises(SystemExit) as exc:
        q.main([*data, *args, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory):
    """Five generated scenes as PNG files and a JSONL set: four labelled items (10 answers
    each, relative and absolute image paths), one unlabelled; returns (jsonl, images)."""
    from vllm_prumerge.testing import make_scenes

    root = tmp_path_factory.mktemp("labelled")
    (root / "img").mkdir()
    scenes = make_scenes(5, seed=2)
    questions = ["What colour is the background?", "How many shapes are there?", "Is there text?"]
    lines = []
    for i, scene in enumerate(scenes):
        path = root / "img" / f"scene{i}.png"
        scene.save(path)
        line = {"image": f"img/scene{i}.png" if i % 2 else str(path), "question": questions[i % 3]}
        if i < 4:
            line.update(answers=["two"] * 3 + ["2"] * 4 + ["blue"] * 3, id=f"q{i}")
        lines.append(line)
    jsonl = root / "set.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jsonl, scenes


def mode_counts(checkpoint: str, images, mode: str) -> list[int]:
    """Visual tokens per image from the core encoder (no vLLM), on the PNG-decoded images."""
    from vllm_prumerge import PruMergeConfig

    return encoder_counts(checkpoint, images, PruMergeConfig(mode=mode))


def run_quality(args: list[str], env: dict[str, str] | None = None) -> None:
    run_python([BENCH / "quality.py", *args], env=env, timeout=600)


def check_run(out: Path, checkpoint: str, source: Path, items: int) -> dict:
    """What every run must have written, with the counts checked against the encoder."""
    from PIL import Image

    data = json.loads((out / "quality.json").read_text())
    results = {r["name"]: r for r in data["results"]}
    assert list(results) == CONFIG_NAMES
    assert data["baseline"] == "off"
    assert data["data"] == {"source": str(source), "items": items, "labelled": 4}
    for r in results.values():
        assert r["items"] == items and r["labelled"] == 4
        assert 0 <= r["vqa_accuracy"] <= 1 and 0 <= r["exact_match"] <= 1
        assert set(r["visual_tokens"]) >= {"mean", "p50", "p95"}
        assert r["requests_per_s"] > 0 and r["seconds"] > 0
        assert r["output_tokens"]["max"] <= 3
    # off agrees with itself by definition, and a second, separately run off agrees with it
    # (greedy, float32): the agreement is computed per item, not copied.
    assert results["off"]["agreement_with_off"] == 1.0
    assert results["off-again"]["agreement_with_off"] == 1.0
    assert results["off-again"]["vqa_accuracy_delta_vs_off"]["mean"] == 0.0

    records = [
        json.loads(line) for line in (out / "quality_answers.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "q3", None]
    images = []
    for record in records:
        with Image.open(record["image"]) as image:
            images.append(image.convert("RGB"))

    def counts(name: str) -> list[int]:
        return [r["predictions"][name]["visual_tokens"] for r in records]

    assert counts("off") == counts("off-again") == [576] * items
    assert counts("fixed-64") == [65] * items
    for mode in ("prumerge", "prumerge+"):
        assert counts(mode) == mode_counts(checkpoint, images, mode), mode
    assert results["prumerge"]["visual_tokens"]["mean"] == pytest.approx(
        sum(counts("prumerge")) / items
    )
    report = (out / "quality.md").read_text()
    assert "| config | visual tok/img mean | p50 | p95 |" in report
    assert "VQA acc %" in report and "agree with off %" in report
    assert "| prumerge+ |" in report
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == PNG_MAGIC
    return data


@pytest.mark.engine
def test_offline_run_reports_every_configuration_with_real_counts(
    tiny_llava, labelled_set, tmp_path
):
    jsonl, _ = labelled_set
    out = tmp_path / "out"
    argv = ["--tiny", "--data", jsonl, *CONFIG_ARGS, "--dtype", "float32", "--max-tokens", 3]
    argv += ["--batch-size", 3, "--warmup", 1, "--no-progress", "--out", out]
    run_quality(argv, env=tiny_cache_env(tiny_llava, tmp_path, in_process=True))
    data = check_run(out, tiny_llava, jsonl, 5)
    assert data["backend"] == "offline vllm.LLM" and data["dtype"] == "float32"
    assert any("meaningless" in note for note in data["notes"])


@pytest.mark.server
def test_server_run_counts_visual_tokens_exactly_from_usage(
    tiny_llava, llava_server, labelled_set, tmp_path
):
    jsonl, _ = labelled_set
    out = tmp_path / "out"
    url = llava_server[0]
    argv = ["--server", url, "--data", jsonl, *CONFIG_ARGS, "--max-tokens", 3]
    argv += ["--concurrency", 2, "--warmup", 1, "--no-progress", "--out", out]
    run_quality(argv)
    data = check_run(out, tiny_llava, jsonl, 5)
    assert data["backend"] == f"server {url}"


def test_a_video_on_a_checkpoint_without_video_is_refused_before_any_engine(
    tiny_llava, tmp_path, capsys
):
    q = quality()
    (tmp_path / "clip.mp4").write_bytes(b"never read: refused first")
    (tmp_path / "set.jsonl").write_text(json.dumps({"video": "clip.mp4", "question": "q?"}))
    with pytest.raises(SystemExit) as exc:
        q.main(["--model", tiny_llava, "--data", str(tmp_path / "set.jsonl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{tiny_llava} takes no videos: LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA do" in err


# --- videos, end to end -------------------------------------------------------------------------

VIDEO_CONFIGS = ["off", "prumerge", "prumerge+/adaptive", "prumerge/evs:0.5"]
VIDEO_ARGS = ["--configs", ",".join(VIDEO_CONFIGS[1:]), "--budgets", "", "--frames", 4]


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    """Two real MP4 files and a JSONL set about them: a six-frame scene cut (--frames 4 samples
    frames 0, 1, 3, 5) and a three-frame one (all taken); returns (jsonl, the frames
    sampled as vLLM's loader samples them, decoded by OpenCV here)."""
    from vllm_prumerge.testing import make_video
    from vllm_prumerge.testing.media import encode_mp4, read_video

    root = tmp_path_factory.mktemp("videos")
    clips = {"cut.mp4": make_video(4, 6, kind="cut"), "short.mp4": make_video(9, 3, kind="cut")}
    lines = []
    for i, (name, frames) in enumerate(clips.items()):
        (root / name).write_bytes(encode_mp4(frames))
        lines.append({"video": name, "question": "What happens?", "answers": ["a"] * 10, "id": i})
    jsonl = root / "clips.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jsonl, [read_video(root / name, 4) for name in clips]


@pytest.fixture(scope="module")
def video_counts(video_llava_checkpoint, video_set):
    """Visual tokens per video and configuration by transformers' Video-LLaVA video tower and
    the reduction core (no vLLM), on the independently sampled frames."""
    from _common import parse_configs

    from tests.hf_reference import HFPruMergeVideoLlava, retention_margin
    from vllm_prumerge import PruMergeConfig

    hf = HFPruMergeVideoLlava(video_llava_checkpoint)
    counts = {}
    for config in parse_configs(",".join(VIDEO_CONFIGS)):
        options = config.prumerge
        options = PruMergeConfig.from_dict(
            {"mode": options} if isinstance(options, str) else options
        )
        for frames in video_set[1]:  # no decision within float rounding of its boundary
            if options.temporal != "off":
                assert retention_margin(hf.video_patch_features(frames), options) > 1e-4
        counts[config.name] = [len(hf.video_embeds(frames, options)) for frames in video_set[1]]
    assert counts["off"] == [4 * 257, 3 * 257]  # transformers' own: 257 per frame, CLS kept
    # Across time the cut clip costs less than frame by frame.
    assert counts["prumerge/evs:0.5"][0] < counts["prumerge"][0]
    return counts


def check_video_run(out: Path, source: Path, counts: dict) -> dict:
    data = json.loads((out / "quality.json").read_text())
    assert data["modality"] == "video" and data["data"] == {
        "source": str(source),
        "items": 2,
        "labelled": 2,
    }
    assert [r["name"] for r in data["results"]] == VIDEO_CONFIGS
    records = [
        json.loads(line) for line in (out / "quality_answers.jsonl").read_text().splitlines()
    ]
    assert [Path(r["video"]).name for r in records] == ["cut.mp4", "short.mp4"]
    for name in VIDEO_CONFIGS:
        assert [r["predictions"][name]["visual_tokens"] for r in records] == counts[name], name
    report = (out / "quality.md").read_text()
    assert "# Answer quality vs visual tokens per video" in report
    assert "| config | visual tok/video mean | p50 | p95 |" in report
    assert "| prumerge+/adaptive |" in report
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == PNG_MAGIC
    return data


@pytest.mark.engine
def test_offline_video_run_counts_every_video_exactly_per_frame_and_across_time(
    video_llava_checkpoint, video_set, video_counts, tmp_path
):
    jsonl, _ = video_set
    out = tmp_path / "out"
    argv = ["--tiny", "--data", jsonl, *VIDEO_ARGS, "--dtype", "float32", "--max-tokens", 1]
    argv += ["--warmup", 0, "--no-progress", "--out", out]  # the server run warms up
    run_quality(argv, env=tiny_cache_env(video_llava_checkpoint, tmp_path, in_process=True))
    data = check_video_run(out, jsonl, video_counts)
    assert data["backend"] == "offline vllm.LLM"


@pytest.mark.server
def test_server_video_run_counts_every_video_exactly_from_usage(
    video_server, video_set, video_counts, tmp_path
):
    jsonl, _ = video_set
    out = tmp_path / "out"
    argv = ["--server", video_server[0], "--data", jsonl, *VIDEO_ARGS, "--max-tokens", 2]
    argv += ["--warmup", 1, "--no-progress", "--out", out]
    run_quality(argv)
    check_video_run(out, jsonl, video_counts)
