"""Front-end compatibility check of the plugin against the installed vLLM, without an engine.

Run by `make compat` (scripts/compat.sh) in a separate environment with vLLM 0.33's Python
package; runs as well in the project's own environment (vLLM 0.32), where the test suite covers
the same path end to end with real engines:

    python scripts/compat_check.py            # from the repository root

What it exercises, on a generated tiny LLaVA-1.5 checkpoint (no download), in this process:
1. the general plugin loads (`vllm.plugins.load_general_plugins`) and registers the model class;
2. the CLI hook: vLLM's own `vllm serve` parser (`ServeSubcommand.subparser_init`) gains
   `--plugin prumerge` and `--prumerge-*`, `--plugin prumerge --prumerge-mode prumerge+` parses
   into engine arguments, bad options are parser errors naming the option, and the `vllm serve
   --help=PruMerge` command (a subprocess of the real CLI) lists the options;
3. the front end the API server runs: engine config from those parsed arguments, vLLM's
   renderer (`renderer_from_config`), then prompts with an image through `render_cmpl`: our
   multimodal processor runs the CLIP tower and the reduction, and the prompt updates set each
   image's placeholders. Each image's placeholder count must equal the count of an independent
   transformers pipeline (`tests/hf_reference.py`, hooks on transformers' CLIP), per request
   mode, and match the placeholder ranges and the feature rows handed to the engine;
4. a bad per-request option is refused with an error naming it.

Exits 0 when every check passes, 1 with the failing check otherwise. Prints one line per check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
# Per-request modes sent through mm_processor_kwargs, as a client would.
REQUEST_MODES = ["prumerge", "prumerge+", {"mode": "fixed", "budget": 7}, "off"]


class CheckFailed(AssertionError):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"ok   {what}", flush=True)


def serve_parser():
    """vLLM's real `vllm serve` argument parser, built the way `vllm` builds it."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers)
    return parser, command


def parse_serve(args: list[str]) -> argparse.Namespace:
    parser, command = serve_parser()
    namespace = parser.parse_args(["serve", *args])
    namespace.model = namespace.model_tag  # what `vllm serve` does with its positional
    command.validate(namespace)
    return namespace


def check_cli(checkpoint: str) -> argparse.Namespace:
    import contextlib
    import io

    parser, _ = serve_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {flag for action in serve._actions for flag in action.option_strings}
    check(
        {"--plugin", "--prumerge-mode", "--prumerge-budget"} <= flags,
        "vllm serve's parser has --plugin and --prumerge-* (the CLI hook is installed)",
    )
    for bad, named in (
        (["--prumerge-mode", "prumerge+"], "--plugin"),
        (["--plugin", "prumerge", "--prumerge-mode", "fixed"], "budget"),
        (["--plugin", "prumerge", "--prumerge-k-neighbors", "zero"], "k_neighbors"),
    ):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.suppress(SystemExit):
            parse_serve([checkpoint, *bad])
            raise CheckFailed(f"{' '.join(bad)} was accepted")
        what = f"`vllm serve ... {' '.join(bad)}` is refused naming {named}"
        check(named in stderr.getvalue(), what)
    namespace = parse_serve(
        [
            *[checkpoint, "--plugin", "prumerge", "--prumerge-mode", "prumerge+"],
            *["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"],
            *["--limit-mm-per-prompt", '{"image": 1}', "--trust-request-mm-kwargs"],
        ]
    )
    check(namespace.hf_overrides is not None, "--plugin prumerge sets hf_overrides")
    vllm = Path(sys.executable).with_name("vllm")
    done = subprocess.run(
        [str(vllm), "serve", "--help=PruMerge"], capture_output=True, text=True, timeout=300
    )
    check(
        done.returncode == 0 and "--prumerge-mode" in done.stdout,
        "`vllm serve --help=PruMerge` (the real CLI) lists the options",
    )
    return namespace


def check_front_end(checkpoint: str, namespace: argparse.Namespace) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers.registry import renderer_from_config

    from tests.hf_reference import HFPruMergeLlava
    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.serving.options import ARCHITECTURE
    from vllm_prumerge.testing import make_scenes

    config = AsyncEngineArgs.from_cli_args(namespace).create_engine_config()
    check(
        config.model_config.architectures == [ARCHITECTURE],
        f"the engine config selects {ARCHITECTURE}",
    )
    renderer = renderer_from_config(config)
    image_token = config.model_config.hf_config.image_token_index
    reference = HFPruMergeLlava(checkpoint)
    images = make_scenes(len(REQUEST_MODES), seed=3)
    server_default = PruMergeConfig(mode="prumerge+")
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": images[0]}}]  # server's mode
    expected = [len(reference.image_features(images[0], server_default))]
    for image, mode in zip(images, REQUEST_MODES, strict=True):
        prompts.append(
            {
                "prompt": PROMPT,
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"prumerge": mode},
            }
        )
        options = {"mode": mode} if isinstance(mode, str) else mode
        expected.append(len(reference.image_features(image, PruMergeConfig(**options))))
    outputs = renderer.render_cmpl(prompts)
    counts = [out["prompt_token_ids"].count(image_token) for out in outputs]
    labels = ["server default (prumerge+)", *map(str, REQUEST_MODES)]
    check(
        counts == expected,
        "placeholders per image equal the transformers pipeline's counts: "
        + ", ".join(f"{label}={n}" for label, n in zip(labels, counts, strict=True)),
    )
    check(expected[-1] == 576 and expected[-2] == 8, "off gives 576, fixed budget 7 gives 7 + 1")
    for out, count in zip(outputs, counts, strict=True):
        (placeholder,) = out["mm_placeholders"]["image"]
        (item,) = out["mm_kwargs"]["image"]
        rows = [field.data.shape[0] for field in item.values() if hasattr(field.data, "shape")]
        if placeholder.get_num_embeds() != count or count not in rows:
            raise CheckFailed(
                f"placeholder range {placeholder} / feature rows {rows} != {count} tokens"
            )
    check(True, "each image's placeholder range and feature rows match its count")

    try:
        renderer.render_cmpl(
            [
                {
                    "prompt": PROMPT,
                    "multi_modal_data": {"image": images[0]},
                    "mm_processor_kwargs": {"prumerge": {"k_neighbors": 0}},
                }
            ]
        )
    except Exception as exc:  # vLLM wraps processor errors in several types
        check("k_neighbors" in str(exc), "a bad per-request option is refused naming it")
    else:
        raise CheckFailed("mm_processor_kwargs k_neighbors=0 was accepted")


def check_families() -> None:
    """Every other family's front end: the architecture is picked from the checkpoint, and each
    image's placeholders equal the transformers pipeline's count (LLaVA-NeXT / OneVision crops
    summed; `off` = stock packing), in reduced modes and `off`."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.registry import renderer_from_config

    from tests.hf_reference import HFPruMergeLlava
    from vllm_prumerge import engine_kwargs
    from vllm_prumerge.config import PruMergeConfig
    from vllm_prumerge.serving.options import ARCHITECTURES
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava, make_scenes

    images = [
        image.resize(size)
        for image, size in zip(make_scenes(2, seed=4), [(700, 700), (300, 700)], strict=True)
    ]
    for family, architecture in (
        ("llava_next", "LlavaNextForConditionalGeneration"),
        ("siglip", "LlavaForConditionalGeneration"),
        ("onevision", "LlavaOnevisionForConditionalGeneration"),
    ):
        checkpoint = str(cached_tiny_llava(TinyLlavaSpec(family=family)))
        engine = EngineArgs(
            model=checkpoint, dtype="float32", max_model_len=4096, **engine_kwargs("prumerge")
        )
        config = engine.create_engine_config()
        check(
            config.model_config.architectures == [ARCHITECTURES[architecture]],
            f"{family}: the engine config selects {ARCHITECTURES[architecture]}",
        )
        renderer = renderer_from_config(config)
        image_token = config.model_config.hf_config.image_token_index
        reference = HFPruMergeLlava(checkpoint)
        prompts, expected = [], []
        for image in images:
            for mode in ("prumerge", "prumerge+", "off"):
                prompts.append(
                    {
                        "prompt": PROMPT,
                        "multi_modal_data": {"image": image},
                        "mm_processor_kwargs": {"prumerge": mode},
                    }
                )
                expected.append(len(reference.image_embeds(image, PruMergeConfig(mode=mode))))
        counts = [
            out["prompt_token_ids"].count(image_token) for out in renderer.render_cmpl(prompts)
        ]
        check(
            counts == expected,
            f"{family}: placeholders per image equal the transformers pipeline's: {counts}",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="LLaVA-1.5 checkpoint folder to check with. Default: the generated tiny one "
        "(cached in ~/.cache/vllm-prumerge or $VLLM_PRUMERGE_CACHE).",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    start = time.perf_counter()

    import torch
    import transformers
    import vllm
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from vllm_prumerge.serving.options import ARCHITECTURE
    from vllm_prumerge.testing import cached_tiny_llava

    print(
        f"vllm {vllm.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {sys.version.split()[0]}",
        flush=True,
    )
    try:
        load_general_plugins()
        check(
            ARCHITECTURE in ModelRegistry.get_supported_archs(),
            f"the general plugin registers {ARCHITECTURE}",
        )
        checkpoint = args.checkpoint or str(cached_tiny_llava())
        namespace = check_cli(checkpoint)
        check_front_end(checkpoint, namespace)
        if args.checkpoint is None:
            check_families()
    except CheckFailed as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"all checks passed against vLLM {vllm.__version__} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
