"""The main job in one command: offline `LLM.generate` with PruMerge on a generated tiny LLaVA.

Generates (once, cached) a tiny LLaVA-1.5-shaped checkpoint, starts a real vLLM engine with the
plugin and asks about a few generated scene images, each once in the chosen mode and once in
stock mode (`off`, per request). Prints progress, then one table per image: the visual tokens
the LLM received in each mode (counted in the engine's prompt token ids) and the generated text.
The weights are random, so the text is gibberish; the token counts are real.

vLLM's INFO and WARNING logs, library warnings and progress bars are hidden unless --verbose
(on a CPU, vLLM warns about a dozen optional speed-ups); errors show in full.

    make demo                       # or: python examples/demo.py [--mode prumerge+] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vllm_prumerge.testing.engine_args import add_number_options

MODES = ("prumerge", "prumerge+", "fixed", "off")
STOCK_TOKENS = 576  # LLaVA-1.5: 24 x 24 CLIP patches per image
TEXT_WIDTH = 48


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python examples/demo.py --mode fixed --budget 64 --images 2",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="LLaVA-1.5 checkpoint (hub id or folder). Default: the generated tiny one (cached "
        "in ~/.cache/vllm-prumerge or $VLLM_PRUMERGE_CACHE).",
    )
    parser.add_argument(
        "--mode",
        default="prumerge",
        choices=MODES,
        help="reduction mode of the engine: prumerge (~32 tokens per image on a real "
        "checkpoint), prumerge+ (~144), fixed (--budget tokens) or off (stock). Default: "
        "prumerge.",
    )
    add_number_options(
        parser,
        ("--budget", int, None, "fixed mode: tokens kept per image."),
        ("--images", int, 4, "number of generated scene images. Default: 4."),
        ("--max-tokens", int, 16, "tokens generated per answer. Default: 16."),
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="engine dtype (the tower runs in it too): float32, bfloat16, float16 or auto. "
        "Default: float32.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show vLLM's INFO and WARNING logs, library warnings and progress bars (hidden by "
        "default; errors always show in full).",
    )
    return parser


def quiet_down() -> None:
    """Hide all but errors of vLLM, torch and transformers, in this and the engine's processes.

    Set before vLLM is imported: vLLM reads VLLM_LOGGING_LEVEL when it configures logging, and
    its engine processes inherit the environment. A value the user set is kept. torch reads
    TORCH_LOGS once, at import: where torch is imported already, its loggers are set here.
    """
    import warnings

    user_torch_logs = "TORCH_LOGS" in os.environ
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_LOGS", "-all")  # torch's own loggers: errors only
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")  # library bars (vLLM's weight loading: see LLM())
    warnings.simplefilter("ignore")
    # vllm_prumerge imports torch, which read TORCH_LOGS at its import: set its loggers here
    if "torch" in sys.modules and not user_torch_logs:
        import logging

        for name in ["torch", *logging.root.manager.loggerDict]:
            if name == "torch" or name.startswith("torch."):
                logging.getLogger(name).setLevel(logging.ERROR)


def step(text: str, end: str = "\n") -> None:
    print(text, end=end, flush=True)


def shorten(text: str) -> str:
    text = repr(text)
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 4] + "...'"


def print_table(index: int, total: int, size: tuple[int, int], rows: list[tuple]) -> None:
    """One image: a row per mode with its visual tokens, share of stock and the text."""
    print(f"\nimage {index}/{total} ({size[0]}x{size[1]} px)")
    print(f"  {'mode':<13}{'visual tokens':>13}{'of stock':>10}   text")
    for label, tokens, text in rows:
        share = f"{100 * tokens / STOCK_TOKENS:.1f} %"
        print(f"  {label:<13}{tokens:>13}{share:>10}   {shorten(text)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.max_tokens < 1:
        parser.error("--images and --max-tokens must be >= 1")
    options = {"budget": args.budget} if args.budget is not None else {}
    if not args.verbose:
        quiet_down()  # before vLLM is imported
    from vllm_prumerge import PruMergeConfig

    try:
        PruMergeConfig.from_dict({"mode": args.mode, **options})
    except ValueError as exc:
        parser.error(str(exc))
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm_prumerge.testing import make_scenes

    step(f"vllm-prumerge demo: mode {args.mode}, {args.images} generated scene image(s)")
    if args.model:
        model = args.model
        step(f"[1/3] checkpoint: {model}")
    else:
        from vllm_prumerge.testing import cached_tiny_llava

        step("[1/3] tiny LLaVA-1.5 checkpoint (random weights, generated once) ... ", end="")
        model = str(cached_tiny_llava())
        step("ok")
    step("[2/3] starting a vLLM engine with the plugin (about a minute on 2 CPU cores) ... ", "")
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    from vllm_prumerge import engine_kwargs

    llm = LLM(
        model=model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=2048,
        limit_mm_per_prompt={"image": 1},
        use_tqdm_on_load=args.verbose,  # vLLM's own bar ignores TQDM_DISABLE
        **engine_kwargs(args.mode, **options),
    )
    step(f"ready in {time.perf_counter() - start:.0f} s")

    images = make_scenes(args.images, seed=0)
    # Each image in the engine's mode, and in stock mode through a per-request override.
    modes = [(args.mode, None)] + ([("off (stock)", "off")] if args.mode != "off" else [])
    prompts = [
        {
            "prompt": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
            "multi_modal_data": {"image": image},
            **({"mm_processor_kwargs": {"prumerge": override}} if override else {}),
        }
        for image in images
        for _, override in modes
    ]
    step(f"[3/3] answering {len(prompts)} request(s) ... ", end="")
    start = time.perf_counter()
    outputs = llm.generate(
        prompts,
        SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
        use_tqdm=args.verbose,
    )
    step(f"done in {time.perf_counter() - start:.1f} s")

    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    for i, image in enumerate(images):
        rows = []
        for j, (label, _) in enumerate(modes):
            out = outputs[i * len(modes) + j]
            rows.append((label, out.prompt_token_ids.count(image_token), out.outputs[0].text))
        print_table(i + 1, len(images), image.size, rows)
    print(
        "\nvisual tokens: what the LLM received per image (PruMerge's kept tokens + 1 merged\n"
        f"extra token); stock LLaVA-1.5 uses {STOCK_TOKENS}. Random weights: the text is "
        "gibberish,\nthe counts are real."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
