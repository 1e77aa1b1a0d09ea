"""Shared pieces of the benchmark scripts: generated checkpoints, workload, configurations and
statistics (command-line options: `_cli`; reports: `_report`).

Imports neither vLLM nor matplotlib at module level: `prefill_transformers.py` uses it on machines
where only torch and transformers are installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_CONFIGS = "off,prumerge,prumerge+,fixed:576,fixed:288,fixed:144,fixed:64,fixed:32"
# With --frames: fixed budgets are per frame, so a large one times the frames overflows the
# context; the defaults stay within 2048 tokens for 8 frames.
DEFAULT_VIDEO_CONFIGS = "off,prumerge,prumerge+,fixed:64,fixed:16"


def default_configs(frames: int) -> str:
    """The --configs default of a workload of images (`frames` 0) or videos."""
    return DEFAULT_VIDEO_CONFIGS if frames > 0 else DEFAULT_CONFIGS


# Shapes of the generated checkpoints (--synthetic): "tiny" is the test fixture, where fixed
# per-request overheads dominate on a CPU; "small" has a text model large enough that prompt
# length shows in the cost on a CPU while the whole comparison still runs in minutes; "medium"
# has a text model ~8x small's per token (1024 wide, 8 layers), for workloads where the LLM, not
# the front end, is the bottleneck. All keep the real tower geometry (336 px, 14 px patches: 576
# patches + CLS; SigLIP 384 px: 729 patches); --tower real also gives the tower its real size.
_TEXT = ("text_hidden_size", "text_layers", "text_heads", "text_intermediate_size")
_SMALL_TOWER = dict(
    vision_hidden_size=128, vision_layers=3, vision_heads=4, vision_intermediate_size=512
)
SYNTHETIC_SPECS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {**dict(zip(_TEXT, (512, 4, 16, 1408), strict=True)), **_SMALL_TOWER},
    "medium": {**dict(zip(_TEXT, (1024, 8, 32, 2816), strict=True)), **_SMALL_TOWER},
}
TOWERS = ("preset", "real")
FAMILIES = ("llava", "llava_next", "siglip", "onevision", "next_video", "video_llava")

# Questions of varied length (a few tokens to a paragraph), so text cost is not a constant.
QUESTIONS = (
    "What is this?",
    "Describe the image.",
    "How many objects are there?",
    "Is there any text in the image? If so, what does it say?",
    "What colour is the largest shape, and where is it in the picture?",
    "Describe the picture in detail, including every shape, its colour and its position.",
    "Answer the question using a single word or phrase. Which shape is closest to the centre?",
    "List every object you can see, from left to right, and say which ones overlap each other.",
    "Is the background a plain colour or a gradient? Which colours does it go between, and in "
    "which direction does it change?",
    "You are helping a person who cannot see this image. Describe the overall layout first, then "
    "the most salient object, then any text, and finish with the colours of the background. Be "
    "precise about positions (top, bottom, left, right, centre) and relative sizes.",
    "Count the circles, the squares, the triangles and the lines separately, then give the total.",
    "Read out any words or numbers in the image, in reading order, and say what colour each is.",
)


def synthetic_checkpoint(
    size: str, family: str = "llava", tower: str = "preset"
) -> tuple[str, dict[str, Any]]:
    """(folder, spec fields) of the generated checkpoint: text model and tower of preset `size`
    (see SYNTHETIC_SPECS), of `family` (one of FAMILIES), with the family's real
    tower shape when `tower` is "real"; made once and cached under ~/.cache/vllm-prumerge."""
    from vllm_prumerge.testing import TinyLlavaSpec
    from vllm_prumerge.testing.engine_args import resolve_model
    from vllm_prumerge.testing.towers import FAMILY_TOWERS, spec_fields

    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    fields = dict(SYNTHETIC_SPECS[size])
    if tower == "real":  # the family's production tower shape (vllm_prumerge.testing.towers)
        if family not in FAMILY_TOWERS:
            raise ValueError(f"no production tower shape is known for family {family!r}")
        fields.update(spec_fields(FAMILY_TOWERS[family]))
    spec = TinyLlavaSpec(family=family, **fields)
    return resolve_model(None, spec), dataclasses.asdict(spec)


def modality(frames: int) -> str:
    """What each request sends: "video" (`frames` > 0 frames) or "image"."""
    return "video" if frames > 0 else "image"


def placeholder_token_id(model: str, frames: int = 0) -> int:
    """The token id the checkpoint's prompts carry once per visual token of the request's image
    (`image_token_index`) or video (`video_token_index`; `frames` > 0), from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    key = f"{modality(frames)}_token_index"
    token = getattr(config, key, None)
    if token is None:
        raise ValueError(
            f"{model} takes no {modality(frames)}s (its config has no {key}; "
            f"{type(config).__name__}): use a checkpoint that takes videos, or --frames 0"
        )
    return token


def chat_prompt(model: str, frames: int = 0) -> Any:
    """The checkpoint's `ChatPrompt` for this workload: the OpenAI content format, unless the
    requests carry videos and the chat template drops video parts (then vLLM's "string" format,
    which a server must be started with: `--chat-template-content-format string`)."""
    from vllm_prumerge.testing.prompts import ChatPrompt

    chat = ChatPrompt(model)
    if frames > 0:
        placeholder_token_id(model, frames)  # a clear error for a checkpoint without video
        if chat.drops("video"):
            chat = ChatPrompt(model, content_format="string")
    return chat


def filler_token_id(tokenizer: Any) -> int:
    """An ordinary text token (" the") that stands in for visual tokens in text-equivalent
    prompts; any text token costs the same in the LLM."""
    ids = tokenizer.encode(" the", add_special_tokens=False)
    if not ids:
        raise ValueError("the tokenizer gives no token for ' the'")
    return ids[-1]


def text_equivalent_ids(prompt_token_ids: Sequence[int], image_token_id: int, filler: int) -> list:
    """The text-equivalent of an image prompt: every visual (placeholder) token replaced by
    `filler`, so the text-only prompt has exactly the image prompt's length and layout."""
    return [filler if t == image_token_id else t for t in prompt_token_ids]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One compared configuration: a display name and the request-level PruMerge options.

    `prumerge` is the value of `mm_processor_kwargs["prumerge"]` for every request of this
    configuration (a mode name or a dict of PruMergeConfig fields).
    """

    name: str
    prumerge: str | dict[str, Any]

    @property
    def mode(self) -> str:
        return self.prumerge if isinstance(self.prumerge, str) else self.prumerge["mode"]


def _with_temporal(config: BenchConfig, text: str) -> BenchConfig:
    """`config` with the temporal stage of `text`: "evs" / "evs:RATE" / "adaptive" /
    "adaptive:THRESHOLD" (defaults: PruMergeConfig's)."""
    name, _, value = text.partition(":")
    if name not in ("evs", "adaptive"):
        raise ValueError(
            f"unknown temporal setting {text!r}: use evs[:RATE] or adaptive[:THRESHOLD]"
        )
    spec = config.prumerge
    options = dict({"mode": spec} if isinstance(spec, str) else spec)
    options["temporal"] = name
    if value:
        key = "temporal_rate" if name == "evs" else "temporal_threshold"
        try:
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"bad temporal value in {text!r}: a number in [0, 1)") from None
    return BenchConfig(f"{config.name}/{text}", options)


def parse_configs(text: str) -> list[BenchConfig]:
    """`"off,prumerge,prumerge+,fixed:64,fixed:64s,prumerge+/adaptive"` -> configurations
    (names unique).

    `fixed:N` keeps N patches by class attention (+ the extra token); `fixed:Ns` adds
    PruMerge+-style spatial samples; `fixed:0.25` keeps a fraction of the patches. A reducing
    configuration followed by `/evs[:RATE]` or `/adaptive[:THRESHOLD]` reduces videos across
    time first (PruMergeConfig.temporal).
    """
    configs: list[BenchConfig] = []
    for raw in text.split(","):
        item, _, temporal = raw.strip().partition("/")
        if temporal:
            base = parse_configs(item)[0]
            configs.append(_with_temporal(base, temporal.strip().lower()))
            continue
        if not item:
            continue
        lower = item.lower()
        if lower in ("off", "prumerge", "prumerge+"):
            configs.append(BenchConfig(lower, lower))
        elif lower.startswith("fixed:"):
            value = lower.split(":", 1)[1]
            spatial = value.endswith("s")
            value = value.removesuffix("s")
            options: dict[str, Any] = {"mode": "fixed"}
            try:
                if "." in value:
                    options["budget_ratio"] = float(value)
                else:
                    options["budget"] = int(value)
            except ValueError:
                raise ValueError(
                    f"bad fixed budget in {item!r}: use fixed:N or fixed:0.25"
                ) from None
            if spatial:
                options["spatial_samples"] = True
            configs.append(BenchConfig(f"fixed-{value}{'+s' if spatial else ''}", options))
        else:
            raise ValueError(
                f"unknown configuration {item!r}: use off, prumerge, prumerge+, fixed:N, "
                "fixed:Ns (with spatial samples) or fixed:RATIO"
            )
    names = [c.name for c in configs]
    if not configs or len(set(names)) != len(names):
        raise ValueError(f"configurations must be non-empty and unique, got {names}")
    from vllm_prumerge.config import PruMergeConfig  # validate now, not after the engine starts

    for config in configs:
        spec = config.prumerge
        PruMergeConfig.from_dict({"mode": spec} if isinstance(spec, str) else spec)
    return configs


def load_images(
    count: int,
    seed: int,
    images_dir: str | None = None,
    *,
    start: int = 0,
    size: tuple[int, int] = (336, 336),
) -> list[Any]:
    """`count` RGB images: generated scenes of `size` (width, height; deterministic in `seed`),
    or the files of `images_dir` in name order, cycled; `start` skips that many images."""
    if images_dir:
        from vllm_prumerge.testing.images import IMAGE_SUFFIXES, find_images, open_image

        files = find_images(images_dir)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
        return [open_image(files[i % len(files)]) for i in range(start, start + count)]
    from vllm_prumerge.testing import make_scene

    # make_scenes' seeding, extended with `start`: seed * 100_003 + index.
    return [make_scene(seed * 100_003 + i, size=size) for i in range(start, start + count)]


def load_videos(
    count: int,
    seed: int,
    frames: int,
    images_dir: str | None = None,
    *,
    start: int = 0,
    size: tuple[int, int] = (336, 336),
    kind: str = "panning",
) -> list[Any]:
    """`count` videos of `frames` frames each, uint8 `[T, H, W, 3]` numpy arrays of `size`
    (width, height): generated, of `kind` (`make_video`: a camera panning across one scene, one
    scene held, or a scene cut half-way; deterministic in `seed`, scenes numbered as in
    `load_images`); or `frames` consecutive images of `images_dir` per video (name order,
    cycled), resized to `size`."""
    import numpy as np

    if images_dir:
        pictures = load_images(count * frames, seed, images_dir, start=start * frames)
        return [
            np.stack([np.asarray(p.resize(size)) for p in pictures[v * frames : (v + 1) * frames]])
            for v in range(count)
        ]
    from vllm_prumerge.testing import make_video

    return [
        make_video(seed * 100_003 + i, frames, size=size, kind=kind)
        for i in range(start, start + count)
    ]


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One request of the workload: an image (or a video) and a question about it, and (when
    the workload was built with a `ChatPrompt`) the prompt's token ids as the checkpoint's chat
    template renders the chat message (the image or video, then the question): what
    `vllm serve` builds."""

    image: Any  # PIL.Image.Image, RGB; None for a video request
    question: str
    prompt_token_ids: tuple[int, ...] | None = None
    video: Any = None  # uint8 numpy [T, H, W, 3] for a video request

    @property
    def modality(self) -> str:
        return "image" if self.video is None else "video"

    @property
    def media(self) -> Any:
        """What the request sends: the image, or the video's frames."""
        return self.image if self.video is None else self.video


def build_workload(
    count: int,
    seed: int,
    images_dir: str | None = None,
    *,
    start: int = 0,
    size: tuple[int, int] = (336, 336),
    prompt: Any = None,
    frames: int = 0,
    video_kind: str = "panning",
) -> list[WorkItem]:
    """`count` (image, question) pairs, deterministic in `seed`; generated images of `size`;
    with `frames` > 0, (video of `frames` frames, question) pairs instead (`load_videos`, of
    `video_kind`); with
    `prompt` (a `vllm_prumerge.testing.prompts.ChatPrompt`), each with its prompt ids.

    `start` continues the same image sequence: warm-up requests use images after the measured
    ones, so they never share an image (or a cache entry) with them.
    """
    rng = random.Random(seed * 7919 + start)
    if frames > 0:
        videos = load_videos(
            count, seed, frames, images_dir, start=start, size=size, kind=video_kind
        )
        questions = [rng.choice(QUESTIONS) for _ in videos]
        return [
            WorkItem(
                None,
                q,
                None if prompt is None else tuple(prompt.token_ids(q, images=0, videos=1)),
                video=video,
            )
            for video, q in zip(videos, questions, strict=True)
        ]
    images = load_images(count, seed, images_dir, start=start, size=size)
    questions = [rng.choice(QUESTIONS) for _ in images]
    return [
        WorkItem(image, q, None if prompt is None else tuple(prompt.token_ids(q)))
        for image, q in zip(images, questions, strict=True)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p95, p99, min, max of `values` (NaN when empty)."""
    if not values:
        nan = float("nan")
        return {"mean": nan, "p50": nan, "p90": nan, "p95": nan, "p99": nan, "min": nan, "max": nan}
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


# --------------------------------------------------------------------------------------------
# vLLM's load generator, `vllm bench serve`, for the scripts that measure a server


def write_dataset(path: Path, requests: Sequence[list[dict[str, Any]]]) -> Path:
    """A `vllm bench serve --dataset-name custom` JSONL: one chat message's content parts per
    line (sent as they are: `--skip-tokenizer-init` applies no chat template client-side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": parts}) + "\n" for parts in requests))
    return path


def bench_serve_argv(
    base: str, model: str, dataset: Path, count: int, output_len: int, **options: Any
) -> list[str]:
    """`vllm bench serve` arguments: the `count` chat requests of `dataset` (`write_dataset`)
    to the server at `base`, at most `output_len` tokens each, greedy. `options`: `body` (more
    of the request body, e.g. mm_processor_kwargs), `ignore_eos`, `rate` (requests/s, default
    inf), `concurrency` (0: unlimited), `seed`, `result` (the path of its saved result), `quiet`
    (no progress bar), `extra` (more arguments).

    `--dataset-name custom` with `--skip-tokenizer-init` sends each line's content parts as they
    are (vLLM 0.32's `custom_image` takes no `video_url` part), but then asks for one output
    token: the output length goes in --extra-body's max_completion_tokens, which wins."""
    body = {"max_completion_tokens": output_len, **options.get("body", {})}
    argv = [
        *("--backend", "openai-chat", "--endpoint", "/v1/chat/completions"),
        *("--base-url", base, "--model", model, "--skip-tokenizer-init"),
        *("--dataset-name", "custom", "--dataset-path", str(dataset), "--disable-shuffle"),
        *("--num-prompts", str(count), "--output-len", str(output_len), "--temperature", "0"),
        *(
            "--request-rate",
            str(options.get("rate", math.inf)),
            "--seed",
            str(options.get("seed", 0)),
        ),
        *("--ready-check-timeout-sec", "0", "--save-detailed", "--extra-body", json.dumps(body)),
        *("--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,95,99"),
    ]
    if options.get("ignore_eos"):
        argv.append("--ignore-eos")
    if options.get("concurrency"):
        argv += ["--max-concurrency", str(options["concurrency"])]
    if options.get("result") is not None:
        result = options["result"]
        argv += ["--save-result", "--result-dir", str(result.parent)]
        argv += ["--result-filename", result.name]
    if options.get("quiet"):
        argv.append("--disable-tqdm")
    return argv + list(options.get("extra", ()))


async def bench_serve(argv: list[str]) -> dict[str, Any]:
    """One `vllm bench serve` run, in this process: vLLM's own parser and load generator (its
    printed summary goes to stderr); returns its result, per-request lists included."""
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    with contextlib.redirect_stdout(sys.stderr):
        return await main_async(parser.parse_args(argv))
