"""The main job in one command: offline `LLM.generate` with PruMerge on a generated tiny LLaVA.

Generates (once, cached) a tiny LLaVA-1.5-shaped checkpoint, starts a real vLLM engine with the
plugin and prints, per image, the visual tokens the LLM received and the generated text. The
weights are random, so the text is gibberish; the token counts are real.

    make demo                       # or: python examples/demo.py [--mode prumerge+] [--model ID]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="LLaVA checkpoint (hub id or folder); default: the generated tiny one",
    )
    parser.add_argument(
        "--mode",
        default="prumerge",
        help="prumerge | prumerge+ | off | fixed (with --budget); default prumerge",
    )
    parser.add_argument("--budget", type=int, default=None, help="tokens per image in fixed mode")
    parser.add_argument("--images", type=int, default=4, help="number of scene images (default 4)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per image")
    parser.add_argument("--dtype", default="float32", help="engine dtype (default float32)")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_prumerge import engine_kwargs
    from vllm_prumerge.testing import cached_tiny_llava, make_scenes

    model = args.model or str(cached_tiny_llava())
    options = {"budget": args.budget} if args.budget is not None else {}
    start = time.perf_counter()
    llm = LLM(
        model=model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=2048,
        limit_mm_per_prompt={"image": 1},
        **engine_kwargs(args.mode, **options),
    )
    print(f"engine ready in {time.perf_counter() - start:.1f} s (mode={args.mode})")

    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    prompts = [
        {
            "prompt": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
            "multi_modal_data": {"image": image},
        }
        for image in make_scenes(args.images, seed=0)
    ]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for i, out in enumerate(outputs):
        tokens = out.prompt_token_ids.count(image_token)
        print(f"image {i}: {tokens:4d} visual tokens (stock LLaVA: 576) | {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
