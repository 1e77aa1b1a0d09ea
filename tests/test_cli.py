"""`--plugin prumerge` through vLLM's real CLI parser (`vllm serve`'s own parser construction)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_prumerge.serving.options import ARCHITECTURE


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


def _engine_args(parser, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["serve", "some/llava", *argv]))


def test_plugin_flag_selects_the_prumerge_architecture_with_default_options(serve_parser):
    args = _engine_args(serve_parser, ["--plugin", "prumerge"])
    assert args.hf_overrides["architectures"] == [ARCHITECTURE]
    assert args.hf_overrides["prumerge"]["mode"] == "prumerge"
    assert args.hf_overrides["prumerge"]["k_neighbors"] == 32


def test_prumerge_options_reach_the_engine_config(serve_parser):
    args = _engine_args(
        serve_parser,
        [
            "--plugin",
            "prumerge",
            "--prumerge-mode",
            "fixed",
            "--prumerge-budget",
            "64",
            "--prumerge-spatial-samples",
            "--prumerge-order",
            "raster",
            "--hf-overrides",
            '{"image_seq_length": 576}',
        ],
    )
    options = args.hf_overrides["prumerge"]
    assert (options["mode"], options["budget"], options["spatial_samples"], options["order"]) == (
        "fixed",
        64,
        True,
        "raster",
    )
    assert args.hf_overrides["image_seq_length"] == 576  # the user's own overrides survive


def test_without_the_plugin_flag_nothing_changes(serve_parser):
    args = _engine_args(serve_parser, [])
    assert not args.hf_overrides


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prumerge-mode", "prumerge+"], "need(s) --plugin prumerge"),
        (["--plugin", "prumerge", "--prumerge-mode", "bogus"], "mode"),
        (["--plugin", "prumerge", "--prumerge-k-neighbors", "many"], "k_neighbors"),
        (["--plugin", "prumerge", "--prumerge-mode", "fixed"], "budget"),
        (["--plugin", "other"], "invalid choice"),
    ],
)
def test_bad_options_are_clean_parser_errors(serve_parser, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args(["serve", "some/llava", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_vllm_serve_help_documents_the_plugin_options():
    vllm = Path(sys.executable).with_name("vllm")
    out = subprocess.run(
        [str(vllm), "serve", "--help=PruMerge"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for flag in (
        "--plugin",
        "--prumerge-mode",
        "--prumerge-iqr-multiplier",
        "--prumerge-k-neighbors",
        "--prumerge-merge-weighting",
        "--prumerge-order",
        "--prumerge-min-tokens",
        "--prumerge-budget",
        "--prumerge-budget-ratio",
        "--prumerge-spatial-samples",
    ):
        assert flag in out, flag
