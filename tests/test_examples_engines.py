"""The vLLM examples end to end, run like a user would: their token counts equal the core's.

Each example runs as a subprocess with `--tiny` (pointed at the session's checkpoint), with its own
engine (the OpenAI client: against the session's LLaVA-1.5 server; the two Ray examples: in one
local Ray cluster for this module) and the test checks what it wrote:
one record per question, errors recorded for bad inputs, and per-image visual token counts equal
to `len(features)` of `PruMergeEncoder.encode` on the same image and config.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import tiny_cache_env
from tests.helpers import encoder_counts, run_python
from vllm_prumerge import PruMergeConfig

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args, env=None, timeout=900, check=True):
    return run_python([ROOT / "examples" / script, *args], env=env, timeout=timeout, check=check)


def encoder_tokens(checkpoint: str, paths: list[Path], config: PruMergeConfig) -> dict[str, int]:
    """Image file name -> len(features) of PruMergeEncoder.encode (the core reduction)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    counts = encoder_counts(checkpoint, images, config)
    return {p.name: n for p, n in zip(paths, counts, strict=True)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray cluster for both Ray examples (each joins it with `--address`), started
    in this process and stopped after them: one cluster start instead of two."""
    import ray

    context = ray.init(num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """3 scenes, questions.jsonl, a broken image, a missing one and a malformed line."""
    folder = tmp_path_factory.mktemp("inputs")
    run_example("make_inputs.py", folder, "--images", 3, "--broken")
    return folder


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_batch_offline_answers_every_question_with_the_cores_token_counts(
    tiny_llava, inputs, tmp_path
):
    fixed_7 = {"mode": "fixed", "budget": 7}
    overrides = [
        {"id": "as-off", "image": "scene_01.png", "question": "Q?", "prumerge": "off"},
        {"id": "as-fixed", "image": "scene_01.png", "question": "Q?", "prumerge": fixed_7},
        {"id": "bad-mode", "image": "scene_01.png", "question": "Q?", "prumerge": "nope"},
    ]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        (inputs / "questions.jsonl").read_text() + "".join(json.dumps(o) + "\n" for o in overrides)
    )
    output = tmp_path / "out" / "answers.jsonl"
    args = shlex.split("--tiny --mode prumerge+ --dtype float32 --max-tokens 4 --batch-size 2")
    env = tiny_cache_env(tiny_llava, tmp_path, in_process=True)
    done = run_example(
        "batch_offline.py", inputs, *args, "--questions", questions, "--output", output, env=env
    )
    assert "answering" in done.stderr  # the progress bar

    records = read_jsonl(output)
    ids = ["00-0", "01-0", "02-0", "broken", "missing", "6", "as-off", "as-fixed", "bad-mode"]
    assert [r["id"] for r in records] == ids
    errors = {r["id"]: r["error"] for r in records if r["error"]}
    assert set(errors) == {"broken", "missing", "6", "bad-mode"}
    assert "cannot read image" in errors["broken"] and "not found" in errors["missing"]
    assert "invalid JSON" in errors["6"] and "nope" in errors["bad-mode"]

    scenes = sorted(inputs.glob("scene_*.png"))
    plus = encoder_tokens(tiny_llava, scenes, PruMergeConfig(mode="prumerge+"))
    fixed = encoder_tokens(tiny_llava, scenes, PruMergeConfig(mode="fixed", budget=7))
    expected = {f"0{i}-0": plus[f"scene_0{i}.png"] for i in range(3)}
    expected.update({"as-off": 576, "as-fixed": fixed["scene_01.png"]})
    answered = {r["id"]: r for r in records if not r["error"]}
    assert {k: r["image_tokens"] for k, r in answered.items()} == expected
    assert answered["as-fixed"]["image_tokens"] == 8  # budget 7 + the extra token
    assert [answered[k]["mode"] for k in expected] == ["prumerge+"] * 3 + ["off", "fixed"]
    for r in answered.values():
        assert isinstance(r["answer"], str) and r["output_tokens"] >= 1
        assert r["prompt_tokens"] > r["image_tokens"]


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_ray_batch_maps_images_through_an_engine_actor(tiny_llava, ray_address, tmp_path):
    from vllm_prumerge.testing import make_scenes

    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(make_scenes(2, seed=5)):
        scene.save(folder / f"img_{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (folder / "notes.txt").write_text("not an image: ignored")
    output = tmp_path / "ray_answers.jsonl"
    args = shlex.split("--tiny --dtype float32 --max-tokens 4 --concurrency 1 --batch-size 2")
    args += ["--address", ray_address]
    questions = ["--question", "What is this?", "--question", "Any text?"]
    env = tiny_cache_env(tiny_llava, tmp_path)
    run_example("ray_batch.py", folder, *args, *questions, "--output", output, env=env)
    records = read_jsonl(output)
    assert len(records) == 6  # 3 image files x 2 questions
    by_image: dict[str, list[dict]] = {}
    for r in records:
        by_image.setdefault(Path(r["image"]).name, []).append(r)
    assert sorted(by_image) == ["broken.jpg", "img_0.png", "img_1.png"]
    assert all("cannot read image" in r["error"] for r in by_image.pop("broken.jpg"))
    expected = encoder_tokens(
        tiny_llava, sorted(folder.glob("img_*.png")), PruMergeConfig(mode="prumerge")
    )
    for name, rows in by_image.items():
        assert sorted(r["question"] for r in rows) == ["Any text?", "What is this?"]
        for r in rows:
            assert r["error"] is None and r["mode"] == "prumerge"
            assert r["image_tokens"] == expected[name]
            assert isinstance(r["answer"], str) and r["output_tokens"] >= 1


@pytest.mark.server
@pytest.mark.timeout(900)
def test_openai_client_chooses_the_mode_per_request(tiny_llava, llava_server, inputs, tmp_path):
    scenes = [inputs / "scene_00.png", inputs / "scene_02.png"]
    output = tmp_path / "client.jsonl"
    modes = shlex.split("--mode server --mode prumerge+ --mode off --mode fixed --budget 5")
    images = [*scenes, inputs / "broken.png"]
    url = llava_server[0]
    run_example(
        "openai_client.py", *images, "--base-url", f"{url}/v1", *modes, "--max-tokens", "4",
        "--output", output,
    )  # fmt: skip
    records = read_jsonl(output)
    errors = [r for r in records if r["error"]]
    assert [Path(r["image"]).name for r in errors] == ["broken.png"]
    expected = {
        "server": encoder_tokens(tiny_llava, scenes, PruMergeConfig(mode="prumerge")),
        "prumerge+": encoder_tokens(tiny_llava, scenes, PruMergeConfig(mode="prumerge+")),
        "off": {p.name: 576 for p in scenes},
        "fixed": {p.name: 6 for p in scenes},
    }
    answered = [r for r in records if not r["error"]]
    assert len(answered) == len(scenes) * len(expected)
    text_tokens: dict[str, set[int]] = {}
    for r in answered:
        name = Path(r["image"]).name
        assert r["image_tokens"] == expected[r["mode"]][name], r
        assert isinstance(r["answer"], str) and r["completion_tokens"] >= 1
        # usage.prompt_tokens counts the reduced visual tokens: the rest is the same text.
        text_tokens.setdefault(name, set()).add(r["prompt_tokens"] - r["image_tokens"])
    assert all(len(counts) == 1 for counts in text_tokens.values()), text_tokens


# --- demo.py (`make demo`) --------------------------------------------------------------------

DEMO_ROW = re.compile(r"^  (prumerge\+?|fixed|off \(stock\))\s+(\d+)\s+[\d.]+ %\s+'")


def run_demo(*args, env):
    return run_example("demo.py", *args, env=env, check=False)


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_demo_fits_one_screen_with_one_table_per_image_and_no_info_logs(tiny_llava, tmp_path):
    from tests.hf_reference import HFPruMergeLlava
    from vllm_prumerge.testing import make_scenes

    env = tiny_cache_env(tiny_llava, tmp_path)
    # With CUDA_HOME set and no GPU, torch warns at import (as on machines with a CUDA toolkit):
    # the demo must hide that too.
    env["CUDA_HOME"] = str(tmp_path)
    done = run_demo("--images", 3, "--max-tokens", 4, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert len(output.splitlines()) <= 30, output  # one terminal screen
    assert not any(word in output for word in (" INFO ", " WARNING ", "Traceback")), output
    assert max(map(len, output.splitlines())) <= 100, output
    assert "[3/3]" in done.stdout and "done in" in done.stdout  # progress

    hf = HFPruMergeLlava(tiny_llava)
    expected = [len(hf.image_features(image, PruMergeConfig())) for image in make_scenes(3, seed=0)]
    tables = done.stdout.split("\nimage ")[1:]
    assert [t.split(" ", 1)[0] for t in tables] == ["1/3", "2/3", "3/3"]
    for table, count in zip(tables, expected, strict=True):
        rows = [m.groups() for m in map(DEMO_ROW.match, table.splitlines()) if m]
        assert rows == [("prumerge", str(count)), ("off (stock)", "576")], table


@pytest.mark.timeout(300)
@pytest.mark.script
def test_demo_shows_errors_in_full_and_info_logs_only_when_verbose(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    quiet = run_demo("--model", missing, env=env)
    assert quiet.returncode == 1
    assert "Traceback" in quiet.stderr and str(missing) in quiet.stderr.splitlines()[-1]
    assert " INFO " not in quiet.stdout + quiet.stderr
    verbose = run_demo("--model", missing, "--verbose", env=env)
    assert verbose.returncode == 1 and " INFO " in verbose.stdout + verbose.stderr


# --- ray_serve.py -----------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.timeout(900)
def test_ray_serve_llm_serves_the_plugin_with_per_request_modes(
    tiny_llava, ray_address, inputs, tmp_path
):
    import signal
    import time

    from tests.hf_reference import HFPruMergeLlava
    from vllm_prumerge.testing.server import free_port

    ready = tmp_path / "ready"
    log = (tmp_path / "ray_serve.log").open("w")
    args = ["--tiny", "--dtype", "float32", "--trust-request-mm-kwargs", "--address", ray_address]
    server = subprocess.Popen(
        [
            *[sys.executable, str(ROOT / "examples" / "ray_serve.py"), *args],
            *["--port", str(free_port()), "--ready-file", str(ready)],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=tiny_cache_env(tiny_llava, tmp_path),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():
            assert server.poll() is None, (tmp_path / "ray_serve.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "Ray Serve LLM did not start in 600 s"
            time.sleep(2)
        scenes = [inputs / "scene_00.png", inputs / "scene_02.png"]
        output = tmp_path / "client.jsonl"
        base_url = ready.read_text().strip() + "/v1"
        modes = ["--mode", "server", "--mode", "prumerge+", "--mode", "off"]
        run_example("openai_client.py", *scenes, "--base-url", base_url, *modes, "--output", output)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert server.returncode == 0, (tmp_path / "ray_serve.log").read_text()[-6000:]

    hf = HFPruMergeLlava(tiny_llava)
    images = {p.name: Image.open(p).convert("RGB") for p in scenes}
    records = read_jsonl(output)
    assert len(records) == 6 and not any(r["error"] for r in records)
    # Ray Serve LLM has no /tokenize: usage.prompt_tokens carries the count (text + visual).
    (text_tokens,) = {r["prompt_tokens"] - 576 for r in records if r["mode"] == "off"}
    for r in records:
        mode = "prumerge" if r["mode"] == "server" else r["mode"]  # the server's default
        image = images[Path(r["image"]).name]
        expected = len(hf.image_features(image, PruMergeConfig(mode=mode)))
        assert r["prompt_tokens"] == text_tokens + expected, r
