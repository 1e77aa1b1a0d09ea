"""`--plugin prumerge` through vLLM's real CLI parser (`vllm serve`'s own parser construction)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_prumerge.serving.options import ARCHITECTURE, PruMergeOverrides


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


@pytest.fixture(scope="module")
def model(tiny_llava):
    return tiny_llava


def _engine_args(parser, model, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["serve", model, *argv]))


def _hf_config(model, args):
    """The HF config vLLM would build: the checkpoint's, through the parsed overrides."""
    from transformers import AutoConfig

    assert isinstance(args.hf_overrides, PruMergeOverrides)
    return args.hf_overrides(AutoConfig.from_pretrained(model))


def test_plugin_flag_selects_the_prumerge_architecture_with_default_options(serve_parser, model):
    config = _hf_config(model, _engine_args(serve_parser, model, ["--plugin", "prumerge"]))
    assert config.architectures == [ARCHITECTURE]
    assert config.prumerge["mode"] == "prumerge"
    assert config.prumerge["k_neighbors"] == 32


def test_prumerge_options_reach_the_engine_config(serve_parser, model):
    args = _engine_args(
        serve_parser,
        model,
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
    config = _hf_config(model, args)
    options = config.prumerge
    assert (options["mode"], options["budget"], options["spatial_samples"], options["order"]) == (
        "fixed",
        64,
        True,
        "raster",
    )
    assert config.image_seq_length == 576  # the user's own overrides survive


def test_the_temporal_and_ceiling_flags_reach_the_engine_config(serve_parser, model):
    argv = [
        *["--plugin", "prumerge", "--prumerge-temporal", "adaptive"],
        *["--prumerge-temporal-threshold", "0.8", "--prumerge-temporal-rate", "0.5"],
        *["--prumerge-max-tokens", "64"],
    ]
    options = _hf_config(model, _engine_args(serve_parser, model, argv)).prumerge
    assert (
        options["temporal"],
        options["temporal_threshold"],
        options["temporal_rate"],
        options["max_tokens"],
    ) == ("adaptive", 0.8, 0.5, 64)


def test_the_tower_dtype_flag_reaches_the_engine_config_outside_the_reduction_options(
    serve_parser, model
):
    argv = ["--plugin", "prumerge", "--prumerge-tower-dtype", "BF16"]
    config = _hf_config(model, _engine_args(serve_parser, model, argv))
    assert config.prumerge_tower_dtype == "bfloat16"
    assert "tower_dtype" not in config.prumerge
    default = _hf_config(model, _engine_args(serve_parser, model, ["--plugin", "prumerge"]))
    assert getattr(default, "prumerge_tower_dtype", "auto") == "auto"


def test_without_the_plugin_flag_nothing_changes(serve_parser, model):
    args = _engine_args(serve_parser, model, [])
    assert not args.hf_overrides


def test_an_unsupported_checkpoint_is_one_clean_parser_error(serve_parser, capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args(["serve", str(tmp_path), "--plugin", "prumerge"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Qwen2ForCausalLM" in err and "LlavaNextForConditionalGeneration" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "own, flags, expected",
    [
        ({"mode": "prumerge+"}, {}, "prumerge+"),  # the checkpoint's own mode is the default
        ({"mode": "prumerge+"}, {"mode": "off"}, "off"),  # explicit options win
        ({"mode": "fixed", "budget": 9}, {"mode": "prumerge"}, "prumerge"),  # budget dropped
        (None, {}, "prumerge"),
    ],
)
def test_a_checkpoints_own_prumerge_config_is_the_default(own, flags, expected):
    from transformers import LlavaConfig

    config = LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    if own is not None:
        config.prumerge = own
    config = PruMergeOverrides(options=flags)(config)
    assert config.prumerge["mode"] == expected
    assert config.architectures == [ARCHITECTURE]


def test_engine_kwargs_overrides_pickle_and_pick_the_family(tmp_path):
    import pickle

    from transformers import LlavaNextConfig

    from vllm_prumerge import engine_kwargs

    overrides = pickle.loads(pickle.dumps(engine_kwargs("prumerge+")["hf_overrides"]))
    config = overrides(LlavaNextConfig(architectures=["LlavaNextForConditionalGeneration"]))
    assert config.architectures == ["PruMergeLlavaNextForConditionalGeneration"]
    assert config.prumerge["mode"] == "prumerge+"
    with pytest.raises(ValueError, match="k_neighbors"):
        engine_kwargs("prumerge", k_neighbors=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prumerge-mode", "prumerge+"], "need(s) --plugin prumerge"),
        (["--plugin", "prumerge", "--prumerge-mode", "bogus"], "mode"),
        (["--plugin", "prumerge", "--prumerge-k-neighbors", "many"], "k_neighbors"),
        (["--plugin", "prumerge", "--prumerge-mode", "fixed"], "budget"),
        (["--plugin", "other"], "invalid choice"),
        (["--plugin", "prumerge", "--prumerge-temporal", "sometimes"], "temporal"),
        (
            ["--plugin", "prumerge", "--prumerge-mode", "off", "--prumerge-temporal", "evs"],
            "temporal",
        ),
        (["--plugin", "prumerge", "--prumerge-max-tokens", "0"], "max_tokens"),
        (["--prumerge-tower-dtype", "float32"], "need(s) --plugin prumerge"),
        (["--plugin", "prumerge", "--prumerge-tower-dtype", "int8"], "tower_dtype"),
        (["--prumerge-tower-threads", "2"], "need(s) --plugin prumerge"),
        (["--plugin", "prumerge", "--prumerge-tower-threads", "0"], "tower_threads"),
        (["--plugin", "prumerge", "--prumerge-tower-threads", "many"], "tower_threads"),
    ],
)
def test_bad_options_are_clean_parser_errors(serve_parser, capsys, model, argv, message):
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args(["serve", model, *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.script
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
        "--prumerge-importance",
        "--prumerge-max-tokens",
        "--prumerge-temporal",
        "--prumerge-temporal-rate",
        "--prumerge-temporal-threshold",
        "--prumerge-tower-dtype",
        "--prumerge-tower-threads",
    ):
        assert flag in out, flag


def test_a_bad_tower_thread_count_is_a_parser_error_at_start_up(
    serve_parser, capsys, model, monkeypatch
):
    monkeypatch.setenv("VLLM_PRUMERGE_TOWER_THREADS", "many")
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args(["serve", model, "--plugin", "prumerge"])
    assert exc.value.code == 2
    assert "VLLM_PRUMERGE_TOWER_THREADS" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "lots"])
def test_a_bad_tower_threads_option_is_a_one_line_error_at_start_up(
    serve_parser, capsys, model, value
):
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args(
            ["serve", model, "--plugin", "prumerge", "--prumerge-tower-threads", value]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.endswith(f"tower_threads must be 'auto' or a positive integer, got '{value}'")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), ("3", 3)])
def test_the_tower_threads_flag_reaches_the_engine_config(serve_parser, model, value, expected):
    argv = ["--plugin", "prumerge", "--prumerge-tower-threads", value]
    config = _hf_config(model, _engine_args(serve_parser, model, argv))
    assert config.prumerge_tower_threads == expected
    assert "tower_threads" not in config.prumerge
    default = _hf_config(model, _engine_args(serve_parser, model, ["--plugin", "prumerge"]))
    assert getattr(default, "prumerge_tower_threads", None) is None  # auto


@pytest.mark.parametrize("servers", [1, 2])
def test_the_api_server_count_reaches_the_config_the_pre_processor_reads(
    serve_parser, model, servers
):
    """Each API-server process builds its config from engine arguments that vLLM gave its
    count (`_api_process_count`); `auto` divides the cores by it."""
    from vllm_prumerge.serving.options import api_server_count, tower_threads_setting

    args = _engine_args(serve_parser, model, ["--plugin", "prumerge"])
    args.model = model  # `vllm serve` copies its positional `model_tag` after parsing
    args._api_process_count = servers
    hf_config = args.create_model_config().hf_config
    assert api_server_count(hf_config) == servers
    assert tower_threads_setting(hf_config) == "auto"


@pytest.fixture
def unsupported_vllm(monkeypatch) -> list[str]:
    """vLLM reports a release the hook does not support; the cli module's warnings, collected."""
    import vllm
    from vllm.logger import init_logger

    warnings: list[str] = []
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    logger = init_logger("vllm_prumerge.serving.cli")  # the logger install_cli_hook warns on
    monkeypatch.setattr(logger, "warning", lambda message, *args: warnings.append(message % args))
    return warnings


@pytest.mark.parametrize("family", ["llava", "llava_next", "onevision"])
def test_on_an_unsupported_vllm_the_warning_names_the_class_for_the_checkpoints_architecture(
    family, tmp_path_factory, monkeypatch, unsupported_vllm
):
    from transformers import AutoConfig

    from tests.helpers import family_checkpoint
    from vllm_prumerge.serving.cli import install_cli_hook

    checkpoint = family_checkpoint(family, tmp_path_factory)
    ours = "PruMerge" + AutoConfig.from_pretrained(checkpoint).architectures[0]
    monkeypatch.setattr(sys, "argv", ["vllm", "serve", checkpoint, "--plugin", "prumerge"])
    assert install_cli_hook() is False
    (warning,) = unsupported_vllm
    assert f'--hf-overrides \'{{"architectures": ["{ours}"]}}\'' in warning
    assert "found 0.99.0" in warning


def test_on_an_unsupported_vllm_an_unknown_checkpoint_gets_every_familys_class(
    monkeypatch, unsupported_vllm
):
    from vllm_prumerge.serving.cli import install_cli_hook
    from vllm_prumerge.serving.options import ARCHITECTURES

    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "org/not-in-any-cache"])
    assert install_cli_hook() is False
    (warning,) = unsupported_vllm
    for theirs, ours in ARCHITECTURES.items():
        assert f"{ours} for {theirs}" in warning


def test_the_engines_download_dir_reaches_the_config_the_pre_processor_reads(
    serve_parser, model, tmp_path
):
    from vllm_prumerge.serving.options import DOWNLOAD_DIR_KEY

    args = _engine_args(
        serve_parser, model, ["--plugin", "prumerge", "--download-dir", str(tmp_path)]
    )
    args.model = model  # `vllm serve` copies its positional `model_tag` after parsing
    assert getattr(args.create_model_config().hf_config, DOWNLOAD_DIR_KEY) == str(tmp_path)
