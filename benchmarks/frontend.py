"""Per-image front-end cost: where an image request's time goes before the LLM, with the plugin
and with stock vLLM.

Every stage is timed one image at a time (batch 1: the OpenAI server pre-processes requests one
after another, in a single thread per API-server process), for each configuration and torch
thread count:

- decode: the request's base64 PNG data URL -> RGB image (vLLM's `fetch_image`, the server's
  decoder);
- image processor: the checkpoint's Hugging Face image processor -> pixel values (the crops, for
  LLaVA-NeXT);
- tower: the vision tower forward (plugin: up to the layers PruMerge reads, in the API server;
  stock: the same tower's forward, which stock vLLM runs in the engine's worker instead);
- reduction: PruMerge's selection and merge (plugin only; `off` returns the patch features);
- hand-off: vLLM's msgpack encoding of what the pre-processor sends to the engine (plugin: the
  reduced features; stock: the pixel values), with its size;
- vLLM processor: vLLM's own multimodal processor (`apply`: tokenizer, HF processor, for the
  plugin the tower and reduction, prompt updates) on the prompt + image, as the server calls it:
  the end-to-end check of the stage figures.

    python benchmarks/frontend.py --tower real --out out/frontend         # CLIP-L/14-336 shape
    python benchmarks/frontend.py --tower real --tower-dtype bfloat16 --out out/frontend-bf16
    python benchmarks/frontend.py --model llava-hf/llava-1.5-7b-hf --out out/frontend-7b

Writes OUT/frontend.json (every timing, environment) and OUT/frontend.md (medians per stage).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from _cli import (
    add_image_size_argument,
    add_model_arguments,
    add_output_arguments,
    model_label,
    new_parser,
)
from _common import build_workload, summary, synthetic_checkpoint
from _report import device_line, environment, finish, markdown_table, progress

from vllm_prumerge.testing.media import image_data_url
from vllm_prumerge.testing.prompts import ChatPrompt

STAGES = ("decode", "image_processor", "tower", "reduction", "handoff")
STOCK = "stock"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        __doc__,
        "Medians per stage, per configuration and thread count; JSON and Markdown output.",
    )
    model = parser.add_argument_group("model")
    add_model_arguments(
        model,
        "LLaVA-1.5, LLaVA-NeXT, SigLIP-LLaVA or LLaVA-OneVision checkpoint (hub id or "
        "folder). Default: a generated random-weight checkpoint (see --synthetic, --family, "
        "--tower).",
    )
    model.add_argument(
        "--dtype",
        default="auto",
        help="Model dtype, resolved as vLLM resolves it (auto: bfloat16 on a CPU, the "
        "checkpoint's on a GPU); stock vLLM's tower runs in it.",
    )
    model.add_argument(
        "--tower-dtype",
        default="auto",
        help="The plugin's tower dtype (--prumerge-tower-dtype: auto, float32, bfloat16, "
        "float16; auto = the model dtype unless this CPU lacks native arithmetic for it).",
    )
    work = parser.add_argument_group("workload")
    work.add_argument("--num-images", type=int, default=8, help="Images timed per setting.")
    work.add_argument("--seed", type=int, default=0, help="Seed of the generated scenes.")
    work.add_argument(
        "--images", default=None, metavar="DIR", help="Use the images in DIR instead of scenes."
    )
    add_image_size_argument(work)
    work.add_argument(
        "--modes",
        default="off,prumerge",
        help="Comma-separated plugin modes to time (off, prumerge, prumerge+, fixed is not "
        "offered here: its cost is prumerge's).",
    )
    work.add_argument(
        "--stock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time stock vLLM's front end (its processor, and the tower it runs in the "
        "engine).",
    )
    work.add_argument(
        "--threads",
        default="1,2",
        help="Comma-separated torch thread counts for the tower and reduction (the plugin's "
        "VLLM_PRUMERGE_TOWER_THREADS; stock vLLM's tower gets the engine worker's threads).",
    )
    work.add_argument(
        "--warmup", type=int, default=1, help="Untimed images per setting before the timed ones."
    )
    add_output_arguments(parser, "out/frontend", "Output folder.", plots=None)
    return parser


def make_processor(
    model: str, dtype: str, plugin: bool, tower_dtype: str = "auto"
) -> tuple[Any, Any]:
    """vLLM's multimodal processor for `model` (with the plugin's model class or stock vLLM's),
    built as a server builds it; (processor, model config)."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    from vllm_prumerge import engine_kwargs

    load_general_plugins()
    extra = engine_kwargs("prumerge", tower_dtype=tower_dtype) if plugin else {}
    model_config = ModelConfig(model=model, dtype=dtype, **extra)
    return MULTIMODAL_REGISTRY.create_processor(model_config), model_config


def crops_of(tower_info: Any, pixel_values: Any, image: Any) -> Any:
    """The tower batch of one image `[n, 3, H, W]`: the image itself, or LLaVA-NeXT's crops
    (counted by the plugin's processing info, `tower_info`)."""
    if pixel_values.dim() == 5:  # [1, max_crops, 3, H, W], zero-padded
        width, height = image.size
        count = tower_info.get_num_crops(image_width=width, image_height=height)
        return pixel_values[0, :count]
    return pixel_values


def timed(row: dict[str, Any], key: str, fn: Any) -> Any:
    """Run `fn`; record its wall seconds as row[key] and the process's CPU seconds (every
    thread) as row[key + "_cpu"]; return its result."""
    cpu = time.process_time()
    start = time.perf_counter()
    result = fn()
    row[key] = time.perf_counter() - start
    row[key + "_cpu"] = time.process_time() - cpu
    return result


def time_image(
    processor: Any,
    model_config: Any,
    tower_info: Any,
    image: Any,
    prompt_ids: list[int],
    config: Any,
    threads: int,
    stock_tower: Any = None,
) -> dict[str, Any]:
    """Every stage for one image; `config` None = stock vLLM (its tower timed separately, in
    `stock_tower`: the same weights in the model dtype). `tower_info`: the plugin's processing
    info, whose encoder holds the plugin's tower; `prompt_ids`: the chat prompt as the
    checkpoint's template renders it (one image token, unexpanded)."""
    import torch
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.multimodal.utils import fetch_image
    from vllm.utils.torch_utils import set_default_torch_num_threads
    from vllm.v1.serial_utils import MsgpackEncoder

    from vllm_prumerge.reduction import reduce_by_importance
    from vllm_prumerge.vision import tower_scores

    hf_config = model_config.hf_config
    tower = tower_info.encoder.tower
    url = image_data_url(image)
    row: dict[str, Any] = {}
    decoded = timed(row, "decode", lambda: fetch_image(url))
    image_processor = processor.info.get_hf_processor().image_processor
    image = getattr(decoded, "media", decoded)  # vLLM keeps the encoded bytes beside the image
    pixels = timed(
        row,
        "image_processor",
        lambda: image_processor(images=[image], return_tensors="pt")["pixel_values"],
    )
    crops = crops_of(tower_info, pixels, image)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            if config is None:
                timed(row, "tower", lambda: stock_tower(crops.to(stock_tower.dtype)))
                row["reduction"] = row["reduction_cpu"] = 0.0
            else:
                scores = timed(
                    row,
                    "tower",
                    lambda: tower_scores(
                        tower, crops, hf_config.vision_feature_layer, config.importance
                    ),
                )
                timed(row, "reduction", lambda: reduce_by_importance(*scores, config))
    finally:
        torch.set_num_threads(previous)

    prompt = list(prompt_ids)
    kwargs = {} if config is None else {"prumerge": config.to_dict()}
    inputs = ProcessorInputs(
        prompt=prompt,
        mm_data_items=processor.info.parse_mm_data({"image": [decoded]}),
        hf_processor_mm_kwargs=kwargs,
    )
    timing = TimingContext()
    with set_default_torch_num_threads(threads):
        if config is not None:
            processor.info.encoder.num_threads = threads
        result = timed(row, "vllm_processor", lambda: processor.apply(inputs, timing))
    row["vllm_processor_stages"] = dict(timing.stage_secs)
    row["visual_tokens"] = result["prompt_token_ids"].count(hf_config.image_token_index)
    encoder = MsgpackEncoder()
    buffers = timed(row, "handoff", lambda: encoder.encode(result["mm_kwargs"]))
    row["handoff_bytes"] = sum(len(memoryview(b).cast("B")) for b in buffers)
    row["crops"] = int(crops.shape[0])
    return row


def settings_of(args: argparse.Namespace) -> list[tuple[str, Any, int]]:
    """(configuration name, PruMergeConfig or None for stock, threads) to time, in order."""
    from vllm_prumerge.config import PruMergeConfig

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1:
        raise SystemExit("--threads must list positive integers")
    modes = [m.strip().lower() for m in args.modes.split(",") if m.strip()]
    configs = [(mode, PruMergeConfig.from_dict({"mode": mode})) for mode in modes]
    if args.stock:
        configs.insert(0, (STOCK, None))
    return [(name, config, t) for t in threads for name, config in configs]


def markdown_report(data: dict[str, Any]) -> str:
    env = data["environment"]
    header = [
        "config",
        "threads",
        "visual tok/img",
        "decode",
        "image processor",
        "tower",
        "reduction",
        "hand-off",
        "sum of stages",
        "vLLM processor",
        "tower CPU",
        "vLLM processor CPU",
        "hand-off KB",
    ]
    rows = [
        [
            r["name"],
            r["threads"],
            r["visual_tokens"]["mean"],
            *(r["ms"][stage]["p50"] for stage in STAGES),
            r["sum_of_stages_ms_p50"],
            r["ms"]["vllm_processor"]["p50"],
            r["cpu_ms"]["tower"]["p50"],
            r["cpu_ms"]["vllm_processor"]["p50"],
            r["handoff_bytes"]["mean"] / 1024,
        ]
        for r in data["results"]
    ]
    return "\n".join(
        [
            "# Front end per image: decode, image processor, tower, reduction, hand-off",
            "",
            f"Model: `{data['model']}`, model dtype {data['dtype']} (stock's tower), plugin's "
            f"tower {data['tower_dtype']}; {data['num_images']} images "
            f"of {data['settings']['image_size'][0]}x{data['settings']['image_size'][1]} per "
            f"setting, one at a time; {device_line(env)}.",
            "",
            "Milliseconds per image (medians; wall time, and the process's CPU time over all "
            "its threads for the tower and vLLM's processor: on a shared machine, CPU time is "
            "the less disturbed figure). `stock`: stock vLLM's front end is decode, image "
            "processor and hand-off (of pixel values); its `tower` runs in the engine's worker "
            "(timed here with the same weights and threads for comparison). Plugin rows: every "
            "stage runs in the API server's pre-processing thread. `vLLM processor` = vLLM's own "
            "processor `apply` on prompt + image (for the plugin it includes image processor, "
            "tower and reduction; not decode or hand-off).",
            "",
            markdown_table(header, rows),
            "Method: " + data["method"],
            "",
        ]
    )


METHOD = (
    "Each image is a generated scene (or a file of --images) encoded as a PNG data URL, as a "
    "client sends it. Stages are timed with time.perf_counter around vLLM's fetch_image, the "
    "checkpoint's image processor, the vision tower (plugin: vllm_prumerge.vision.tower_scores; "
    "stock: the same tower module's forward), vllm_prumerge.reduction.reduce_by_importance and "
    "vLLM's MsgpackEncoder on the processor's mm_kwargs; the tower and reduction run with "
    "torch.set_num_threads(threads), vLLM's processor under set_default_torch_num_threads("
    "threads) with the plugin's tower at the same count. Settings are interleaved image by "
    "image (every setting times image 1, then image 2, ...), so a change of machine load "
    "affects them alike. Medians over the timed images, after --warmup untimed images."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_images < 1 or args.warmup < 0:
        raise SystemExit("--num-images must be >= 1 and --warmup >= 0")
    settings = settings_of(args)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment({"device": "cuda" if torch.cuda.is_available() else "cpu"})
    print(env["cpu_line"], flush=True)
    wall = time.perf_counter()
    model = args.model or synthetic_checkpoint(args.synthetic, args.family, args.tower)[0]
    plugin, model_config = make_processor(model, args.dtype, True, args.tower_dtype)
    stock_tower = plugin.info.encoder.tower
    if args.stock and stock_tower.dtype != model_config.dtype:
        from vllm_prumerge.encoder import load_vision_tower

        stock_tower = load_vision_tower(
            model,
            model_config.hf_config.vision_config,
            vision_feature_layer=model_config.hf_config.vision_feature_layer,
            dtype=model_config.dtype,
            device=plugin.info.encoder.device,
        )
    stock = make_processor(model, args.dtype, plugin=False)[0] if args.stock else None
    size = tuple(args.image_size)
    chat = ChatPrompt(model)
    items = build_workload(args.num_images, args.seed, args.images, size=size, prompt=chat)
    warm = build_workload(
        max(args.warmup, 1), args.seed, args.images, start=len(items), size=size, prompt=chat
    )
    per_setting: list[list[dict[str, Any]]] = [[] for _ in settings]

    def one(item: Any, config: Any, threads: int) -> dict[str, Any]:
        processor = stock if config is None else plugin
        prompt = list(item.prompt_token_ids)
        args_ = (processor, model_config, plugin.info, item.image, prompt, config, threads)
        return time_image(*args_, stock_tower)

    with progress(len(settings) * len(items), "front end", disable=args.no_progress) as bar:
        for item in warm[: args.warmup]:
            for _, config, threads in settings:
                one(item, config, threads)
        for item in items:  # every setting on this image, then the next image
            for rows, (name, config, threads) in zip(per_setting, settings, strict=True):
                bar.set_description(f"{name}, {threads} thread(s)")
                rows.append(one(item, config, threads))
                bar.update(1)
    results = []
    for rows, (name, _, threads) in zip(per_setting, settings, strict=True):
        keys = (*STAGES, "vllm_processor")
        ms = {key: summary([1e3 * r[key] for r in rows]) for key in keys}
        results.append(
            {
                "name": name,
                "threads": threads,
                "visual_tokens": summary([r["visual_tokens"] for r in rows]),
                "crops": summary([r["crops"] for r in rows]),
                "ms": ms,
                "cpu_ms": {key: summary([1e3 * r[key + "_cpu"] for r in rows]) for key in keys},
                "sum_of_stages_ms_p50": sum(ms[stage]["p50"] for stage in STAGES),
                "handoff_bytes": summary([r["handoff_bytes"] for r in rows]),
                "per_image": rows,
            }
        )
    data = {
        "benchmark": "front end per image",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model_label(args),
        "model_path": model,
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "tower_dtype": plugin.info.tower_precision.describe(),
        "num_images": len(items),
        "settings": dict(vars(args)),
        "method": METHOD,
        "environment": env,
        "results": results,
    }
    return finish(out, "frontend", data, wall, markdown_report)


if __name__ == "__main__":
    main()
