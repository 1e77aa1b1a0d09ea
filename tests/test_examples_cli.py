"""The example scripts' command lines: documented options, clear errors, input rules (no engine)."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

from tests.helpers import run_example_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = [
    *["batch_offline", "openai_client", "ray_batch", "ray_serve", "visualize", "make_inputs"],
    "demo",
]


@pytest.fixture
def examples(monkeypatch):
    """Import an example module by name (the examples folder on sys.path, as when run)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


@pytest.fixture
def run_main(examples, monkeypatch):
    """Run an example's main(argv) in this process, where no engine, Ray or checkpoint may start:
    its exit code (SystemExit's or main's return) and its stderr."""

    def no_start(*_args, **_kwargs):
        raise AssertionError("the example went on to start an engine or build a checkpoint")

    monkeypatch.setattr(examples("common"), "use_cpu_if_no_gpu", no_start)
    monkeypatch.setattr("vllm_prumerge.testing.cached_tiny_llava", no_start)
    monkeypatch.setattr("vllm_prumerge.testing.checkpoint.cached_tiny_llava", no_start)

    def run(name: str, *args) -> tuple[int, str]:
        done = run_example_main(name, *args)
        return done.returncode, done.stderr

    return run


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


@pytest.mark.parametrize(
    "name", ["batch_offline", "openai_client", "ray_batch", "ray_serve", "visualize", "demo"]
)
def test_every_option_of_every_example_has_help_text(examples, name):
    module = examples(name)
    for parser in parsers(module.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), (parser.prog, action.option_strings)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_zero_without_starting_anything(examples, capsys, name):
    # In this process (each script also runs as a script in the engine tests): no start-up each.
    with pytest.raises(SystemExit) as done:
        examples(name).main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["batch_offline.py", "MISSING", "--tiny"],
        ["ray_batch.py", "MISSING", "--tiny"],
        ["visualize.py", "histogram", "--tiny", "MISSING"],
        ["visualize.py", "tokens", "--tiny", "MISSING/a.png"],
        ["openai_client.py", "MISSING/a.png"],
    ],
)
def test_a_missing_input_is_a_usage_error_naming_the_path(run_main, args, tmp_path):
    args = [str(tmp_path / a) if a.startswith("MISSING") else a for a in args]
    code, stderr = run_main(args[0].removesuffix(".py"), *args[1:])
    assert code == 2
    assert "error:" in stderr and str(tmp_path / "MISSING") in stderr


def test_model_or_tiny_is_required(run_main, tmp_path):
    code, stderr = run_main("batch_offline", tmp_path)
    assert code == 2 and "--model" in stderr and "--tiny" in stderr


@pytest.mark.parametrize(
    "name, args, word",
    [
        ("batch_offline", ["{tmp}", "--tiny", "--option", "k_neighbors=zero"], "k_neighbors"),
        ("ray_batch", ["{tmp}", "--tiny", "--mode", "fixed"], "budget"),
        ("ray_serve", ["--tiny", "--option", "k_neighbors=0"], "k_neighbors"),
        ("demo", ["--mode", "fixed", "--verbose"], "budget"),  # --verbose: no quieting here
    ],
)
def test_an_invalid_reduction_option_is_rejected_before_any_engine_starts(
    run_main, tmp_path, name, args, word
):
    code, stderr = run_main(name, *[arg.format(tmp=tmp_path) for arg in args])
    assert code == 2 and word in stderr


def test_ray_batch_concurrency_is_n_or_min_max(examples):
    ray_batch = examples("ray_batch")
    assert ray_batch.concurrency_value("3") == 3
    assert ray_batch.concurrency_value("1,4") == (1, 4)
    for bad in ("0", "4,1", "x", "1,2,3"):
        with pytest.raises(ValueError, match="--concurrency"):
            ray_batch.concurrency_value(bad)


def test_reduction_options_keep_fixed_budgets_to_fixed_mode(examples):
    common = examples("common")
    parser = argparse.ArgumentParser()
    common.add_reduction_arguments(parser, mode_default="prumerge")
    args = parser.parse_args(["--budget", "12", "--option", "iqr_multiplier=2"])
    assert common.reduction_options(args, "fixed")["budget"] == 12
    plus = common.reduction_options(args, "prumerge+")
    assert plus["budget"] is None and plus["iqr_multiplier"] == 2.0
    with pytest.raises(ValueError, match="KEY=VALUE"):
        common.reduction_options(parser.parse_args(["--option", "oops"]), "prumerge")


def test_client_reports_an_unreachable_server(run_main, tmp_path):
    from PIL import Image

    from vllm_prumerge.testing.server import free_port

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, stderr = run_main("openai_client", tmp_path / "a.png", "--base-url", url)
    assert code == 1 and "cannot list models" in stderr


# --- batch_offline.py: where the questions come from ------------------------------------------


def batch_args(examples, *argv):
    return examples("batch_offline").build_parser().parse_args([*map(str, argv), "--tiny"])


def test_questions_jsonl_gives_one_request_per_line_and_records_bad_lines(examples, tmp_path):
    batch_offline = examples("batch_offline")
    lines = [
        json.dumps({"id": "a", "image": "x.png", "question": "Q1?"}),
        json.dumps({"image": "x.png", "question": "Q2?", "prumerge": "off"}),
        "",
        "not json",
        json.dumps({"id": "c", "image": "x.png"}),
        json.dumps({"id": "d", "image": "x.png", "question": "Q?", "prumerge": {"mode": "?"}}),
    ]
    (tmp_path / "questions.jsonl").write_text("\n".join(lines) + "\n")
    args = batch_args(examples, tmp_path, "--mode", "prumerge+")
    requests, source = batch_offline.collect_requests(args)
    batch_offline.resolve_modes(requests, {"mode": "prumerge+"})
    assert source.endswith("questions.jsonl")
    assert [r.id for r in requests] == ["a", "2", "4", "c", "d"]
    assert [r.mode for r in requests] == ["prumerge+", "off", None, None, None]
    assert requests[0].path == tmp_path / "x.png" and requests[0].error is None
    assert "invalid JSON" in requests[2].error
    assert "missing question" in requests[3].error
    assert "bad 'prumerge' override" in requests[4].error


def test_without_a_manifest_sidecar_txt_files_or_the_default_question_apply(examples, tmp_path):
    from PIL import Image

    batch_offline = examples("batch_offline")
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("First?\n\nSecond?\n")
    args = batch_args(examples, tmp_path, "--question", "Default?")
    requests, source = batch_offline.collect_requests(args)
    assert source == "sidecar .txt files"
    assert [(r.id, r.image, r.question) for r in requests] == [
        ("a-0", "a.png", "First?"),
        ("a-1", "a.png", "Second?"),
        ("b", "b.jpg", "Default?"),
    ]
    limited, _ = batch_offline.collect_requests(batch_args(examples, tmp_path, "--limit", 1))
    assert len(limited) == 1
