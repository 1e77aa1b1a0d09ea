"""Per-image front-end cost, stage by stage (decode, image processor, tower, reduction, hand-off to
the engine; vLLM's own processor as the end-to-end check), with the plugin and with stock vLLM,
per torch thread count, one image at a time as the OpenAI server pre-processes requests.

    python benchmarks/frontend.py --tower real --out out/frontend         # CLIP-L/14-336 shape
    python benchmarks/frontend.py --tower real --tower-dtype bfloat16 --out out/frontend-bf16
    python benchmarks/frontend.py --model llava-hf/llava-1.5-7b-hf --out out/frontend-7b

Writes OUT/frontend.json (every timing) and OUT/frontend.md (medians); method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, NamedTuple

import _cli
from _common import summary
from _report import device_line, finish, progress, start_run, table

from vllm_prumerge import PruMergeConfig, engine_kwargs
from vllm_prumerge.testing.engine_args import add_number_options
from vllm_prumerge.testing.media import image_data_url
from vllm_prumerge.testing.prompts import ChatPrompt
from vllm_prumerge.testing.workload import build_workload

MODES = ("off", "prumerge", "prumerge+")
STAGES = ("decode", "image_processor", "tower", "reduction", "handoff")  # "sum of stages"
TIMED = (*STAGES, "vllm_processor")  # each: wall time (`ms`) and CPU time (`cpu_ms`)
COUNTED = ("visual_tokens", "crops", "handoff_bytes")  # per image, summarised as they are
METHOD = (
    "Each image (a scene or a file of --images) sent as a PNG data URL. time.perf_counter around "
    "vLLM's fetch_image, the image processor, the tower (plugin: vision.tower_scores; stock: "
    "its forward), reduction.reduce_by_importance, vLLM's MsgpackEncoder on mm_kwargs and "
    "vLLM's processor, all at `threads` torch threads (the plugin's tower in vLLM's processor "
    "too). Settings interleaved image by image, so a change of machine load affects them "
    "alike. Medians over the timed images, after --warmup untimed images."
)
# The report's columns: (header, dotted path into a result, see _report.cell).
COLUMNS = (
    ("config", "name"),
    ("threads", "threads"),
    ("visual tok/img", "visual_tokens.mean"),
    *((key.replace("_", " ").replace("handoff", "hand-off"), f"ms.{key}.p50") for key in STAGES),
    ("sum of stages", "sum_of_stages_ms_p50"),
    ("vLLM processor", "ms.vllm_processor.p50"),
    ("tower CPU", "cpu_ms.tower.p50"),
    ("vLLM processor CPU", "cpu_ms.vllm_processor.p50"),
    ("hand-off KB", lambda r: r["handoff_bytes"]["mean"] / 1024),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.new_parser(__doc__, "Medians per stage and setting; JSON and Markdown output.")
    model = parser.add_argument_group("model")
    _cli.add_model_arguments(
        model,
        "LLaVA-1.5, LLaVA-NeXT, SigLIP-LLaVA or LLaVA-OneVision checkpoint (hub id or folder). "
        "Default: a generated random-weight checkpoint (see --synthetic, --family, --tower).",
    )
    add_number_options(
        model,
        ("--dtype", str, "auto", "Model dtype as vLLM resolves it (auto: bfloat16 on a CPU, the "
         "checkpoint's on a GPU); stock vLLM's tower runs in it."),
        ("--tower-dtype", str, "auto", "The plugin's tower dtype (--prumerge-tower-dtype: auto, "
         "float32, bfloat16, float16; auto = the model dtype unless this CPU lacks native "
         "arithmetic for it)."),
    )  # fmt: skip
    work = parser.add_argument_group("workload")
    add_number_options(
        work,
        ("--num-images", int, 8, "Images timed per setting."),
        ("--warmup", int, 1, "Untimed images per setting first."),
        ("--seed", int, 0, "Seed of the generated scenes."),
        ("--modes", _cli.names(*MODES), "off,prumerge", "Comma-separated plugin modes to time "
         "(fixed:N is not offered: it costs what prumerge costs)."),
        ("--threads", _cli.ints, "1,2", "Comma-separated torch thread counts of the tower and "
         "reduction (the plugin's VLLM_PRUMERGE_TOWER_THREADS; stock vLLM's tower gets the "
         "engine worker's threads)."),
    )  # fmt: skip
    work.add_argument("--images", metavar="DIR", help="Use the images in DIR instead of scenes.")
    _cli.add_image_size_argument(work)
    work.add_argument(
        "--stock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time stock vLLM's front end (its processor; its tower, run in the engine).",
    )
    _cli.add_output_arguments(parser, "out/frontend", "Output folder.", plots=None)
    return parser


def make_processor(model: str, dtype: str, tower_dtype: str | None = None) -> Any:
    """vLLM's multimodal processor for `model`, built as a server builds it: the plugin's (its
    tower in `tower_dtype`), or stock vLLM's (None)."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    extra = {} if tower_dtype is None else engine_kwargs("prumerge", tower_dtype=tower_dtype)
    return MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=model, dtype=dtype, **extra))


def timed(row: dict[str, Any], key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, its wall seconds put in row[key], CPU seconds in row[key + "_cpu"]."""
    cpu, start = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    row[key], row[key + "_cpu"] = time.perf_counter() - start, time.process_time() - cpu
    return result


class FrontEnd(NamedTuple):
    """What is timed: the plugin's processor (its `info.encoder` holds the plugin's tower),
    stock vLLM's (None: not timed) and the tower stock vLLM runs (same weights, model dtype)."""

    plugin: Any
    stock: Any
    stock_tower: Any

    def time_image(self, item: Any, config: Any, threads: int) -> dict[str, Any]:
        """Every stage for one workload item (its image, and its chat prompt's ids with one image
        token, unexpanded) with `config` (None: stock vLLM) at `threads` torch threads."""
        import torch
        from vllm.multimodal.processing.context import TimingContext
        from vllm.multimodal.processing.inputs import ProcessorInputs
        from vllm.multimodal.utils import fetch_image
        from vllm.utils.torch_utils import set_default_torch_num_threads
        from vllm.v1.serial_utils import MsgpackEncoder

        from vllm_prumerge.reduction import reduce_by_importance
        from vllm_prumerge.vision import tower_scores

        info = self.plugin.info
        hf_config = info.ctx.model_config.hf_config
        processor = self.stock if config is None else self.plugin
        row: dict[str, Any] = {}
        decoded = timed(row, "decode", fetch_image, image_data_url(item.image))
        image = getattr(decoded, "media", decoded)  # vLLM keeps the encoded bytes beside it
        width, height = image.size
        hf_image = processor.info.get_hf_processor().image_processor
        pixels = timed(row, "image_processor", hf_image, images=[image], return_tensors="pt")
        pixels = pixels["pixel_values"]  # [1, 3, H, W]; LLaVA-NeXT: [1, max crops, 3, H, W]
        if pixels.dim() == 5:  # the image's crops, not the zero padding
            pixels = pixels[0, : info.get_num_crops(image_width=width, image_height=height)]
        inputs = ProcessorInputs(
            prompt=list(item.prompt_token_ids),
            mm_data_items=processor.info.parse_mm_data({"image": [decoded]}),
            hf_processor_mm_kwargs={} if config is None else {"prumerge": config.to_dict()},
        )
        timing = TimingContext()
        tower = self.stock_tower if config is None else info.encoder.tower
        layer = hf_config.vision_feature_layer
        with set_default_torch_num_threads(threads), torch.inference_mode():
            if config is None:
                timed(row, "tower", lambda: tower(pixels.to(tower.dtype)))
                row["reduction"] = row["reduction_cpu"] = 0.0
            else:
                scores = timed(row, "tower", tower_scores, tower, pixels, layer, config.importance)
                timed(row, "reduction", reduce_by_importance, *scores, config)
                info.encoder.num_threads = threads  # the plugin's tower in vLLM's processor
        with set_default_torch_num_threads(threads):
            result = timed(row, "vllm_processor", processor.apply, inputs, timing)
        row["vllm_processor_stages"] = dict(timing.stage_secs)
        row["visual_tokens"] = result["prompt_token_ids"].count(hf_config.image_token_index)
        buffers = timed(row, "handoff", MsgpackEncoder().encode, result["mm_kwargs"])
        row["handoff_bytes"] = sum(len(memoryview(b).cast("B")) for b in buffers)
        row["crops"] = int(pixels.shape[0])
        return row


def settings_of(args: argparse.Namespace) -> list[tuple[str, Any, int]]:
    """(configuration name, PruMergeConfig or None for stock, threads) to time, in order."""
    if not args.threads or min(args.threads) < 1:
        raise SystemExit("--threads must list positive integers")
    configs = [("stock", None)] if args.stock else []
    configs += [(mode, PruMergeConfig.from_dict({"mode": mode})) for mode in args.modes]
    return [(name, config, t) for t in args.threads for name, config in configs]


def summarise(setting: tuple[str, Any, int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A setting's result (`settings_of`): summaries of its `rows` (times in ms), and the rows."""
    name, _, threads = setting
    ms = {key: summary([1e3 * r[key] for r in rows]) for key in TIMED}
    of = {key: summary([r[key] for r in rows]) for key in COUNTED}
    return {
        "name": name,
        "threads": threads,
        **of,
        "ms": ms,
        "cpu_ms": {key: summary([1e3 * r[key + "_cpu"] for r in rows]) for key in TIMED},
        "sum_of_stages_ms_p50": sum(ms[stage]["p50"] for stage in STAGES),
        "per_image": rows,
    }


def markdown_report(data: dict[str, Any]) -> str:
    width, height = data["settings"]["image_size"]
    return (
        "# Front end per image: decode, image processor, tower, reduction, hand-off\n\n"
        f"Model: `{data['model']}`, model dtype {data['dtype']} (stock's tower), plugin's tower "
        f"{data['tower_dtype']}; {data['num_images']} images of {width}x{height} per setting, one "
        f"at a time; {device_line(data['environment'])}.\n\n"
        "Milliseconds per image, medians: wall time; `CPU`: the process's CPU time (all threads), "
        "less disturbed on a shared machine. Stock vLLM runs its `tower` in the engine's worker "
        "(timed here alike; its hand-off: pixel values), the plugin every stage in the API server. "
        "`vLLM processor`: vLLM's `apply` on prompt + image. Stages: docs/benchmarks.md.\n\n"
        f"{table(data['results'], COLUMNS)}\nMethod: {data['method']}\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_images < 1 or args.warmup < 0:
        raise SystemExit("--num-images must be >= 1 and --warmup >= 0")
    settings = settings_of(args)
    env, wall = start_run()
    model = _cli.checkpoint(args)[0]
    plugin = make_processor(model, args.dtype, args.tower_dtype)
    dtype, tower = plugin.info.ctx.model_config.dtype, plugin.info.encoder.tower
    stock = make_processor(model, args.dtype) if args.stock else None
    if stock is not None and tower.dtype != dtype:  # stock's tower: same weights, model dtype
        tower = copy.deepcopy(tower).to(dtype)
    front_end = FrontEnd(plugin, stock, tower)
    n, chat = args.num_images, ChatPrompt(model)
    work = build_workload(
        n + args.warmup, args.seed, args.images, size=args.image_size, prompt=chat
    )
    per_setting: list[list[dict[str, Any]]] = [[] for _ in settings]
    with progress(len(settings) * n, "front end", disable=args.no_progress) as bar:
        # The warm-up images (after the timed ones), then every setting on each timed image.
        for i, item in enumerate([*work[n:], *work[:n]]):
            for rows, (name, config, threads) in zip(per_setting, settings, strict=True):
                bar.set_description(f"{name}, {threads} thread(s)")
                row = front_end.time_image(item, config, threads)
                if i >= args.warmup:
                    rows.append(row)
                    bar.update(1)
    data = {
        "benchmark": "front end per image",
        "model": _cli.model_label(args),
        "model_path": model,
        "dtype": str(dtype).removeprefix("torch."),
        "tower_dtype": plugin.info.tower_precision.describe(),
        "num_images": n,
        "settings": dict(vars(args)),
        "method": METHOD,
        "environment": env,
        "results": [summarise(s, rows) for s, rows in zip(settings, per_setting, strict=True)],
    }
    return finish(Path(args.out), "frontend", data, wall, markdown_report)


if __name__ == "__main__":
    main()
