"""Visualise which patches PruMerge kept, sampled and merged (no vLLM; matplotlib for drawing).

Two steps, so the numbers can be used without drawing anything:

1. :func:`token_map` turns one image of a :class:`~vllm_prumerge.reduction.ReducedTokens` into a
   :class:`TokenMap`: plain NumPy arrays on the patch grid (kept outliers, spatial samples, and
   for every patch the kept token that absorbed it most strongly).
2. :func:`draw_token_map` / :func:`draw_count_histogram` draw figures from those numbers;
   :func:`save_figure` writes a PNG.

    from vllm_prumerge.encoder import PruMergeEncoder
    from vllm_prumerge import vis
    encoded = encoder.encode(pixel_values, config)              # pixel_values [B, 3, 336, 336]
    tmap = vis.token_map(encoded.reduced, 0)
    image = vis.model_input_image(pixel_values[0], mean, std)   # the crop the tower saw
    vis.save_figure(vis.draw_token_map(image, tmap, title="prumerge+"), "tokens.png")

Drawing uses matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global state, no
display needed. matplotlib is imported only by the drawing functions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vllm_prumerge.reduction import ReducedTokens, attention_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "EXTRA",
    "ROLE_NAMES",
    "ROLE_OUTLIER",
    "ROLE_PASSTHROUGH",
    "ROLE_PRUNED_TO_EXTRA",
    "ROLE_PRUNED_TO_KEPT",
    "ROLE_SAMPLE",
    "TokenMap",
    "draw_count_histogram",
    "draw_token_map",
    "model_input_image",
    "save_figure",
    "token_map",
]

EXTRA = -1  # ``TokenMap.merged_into`` value of patches absorbed only by the extra token

# Patch roles of ``TokenMap.roles``.
ROLE_PRUNED_TO_EXTRA = 0  # pruned; no kept token chose it, so only the extra token holds it
ROLE_PRUNED_TO_KEPT = 1  # pruned; merged into a kept token (see ``merged_into``)
ROLE_SAMPLE = 2  # kept as a PruMerge+ / fixed-mode spatial sample
ROLE_OUTLIER = 3  # kept for its class attention (IQR outlier, safeguard or fixed budget)
ROLE_PASSTHROUGH = 4  # mode "off": every patch passes through unchanged
ROLE_NAMES = {
    ROLE_PRUNED_TO_EXTRA: "pruned -> extra token",
    ROLE_PRUNED_TO_KEPT: "pruned -> kept token",
    ROLE_SAMPLE: "spatial sample",
    ROLE_OUTLIER: "attention outlier",
    ROLE_PASSTHROUGH: "passed through (mode off)",
}


@dataclasses.dataclass(frozen=True)
class TokenMap:
    """Where one image's reduced tokens came from, on its ``grid x grid`` patch grid.

    Patch indices are row-major (``index = row * grid + column``), as CLIP orders them.

    Attributes:
        grid: patches per side (24 for CLIP-L/14-336).
        attention: ``[N]`` float32 class attention of the patches (NaN in mode ``"off"``
            when no attention was computed).
        fence: the image's IQR upper fence (NaN unless the mode is adaptive).
        kept: ``[num_kept]`` int64 patch index of each kept output token, in output order.
        outliers: ``[num_outliers]`` int64 patches kept for their class attention, in descending
            attention (IQR outliers after the ``min_tokens`` safeguard, or the fixed budget).
        samples: ``[num_kept - num_outliers]`` int64 spatial samples, ascending.
        merged_into: ``[N]`` int64, per patch the patch index of the kept token that absorbed it
            most strongly: itself for a kept patch, :data:`EXTRA` (-1) for a pruned patch that no
            kept token chose (it lives on only in the extra token).
        roles: ``[N]`` int8, one of the ``ROLE_*`` codes per patch.
        num_tokens: tokens the LLM receives for this image (kept + extra; ``N`` in mode off).
        passthrough: True in mode ``"off"`` (nothing reduced, no extra token).
    """

    grid: int
    attention: np.ndarray
    fence: float
    kept: np.ndarray
    outliers: np.ndarray
    samples: np.ndarray
    merged_into: np.ndarray
    roles: np.ndarray
    num_tokens: int
    passthrough: bool

    @property
    def num_patches(self) -> int:
        """N, the patches of the stock model (``grid ** 2``)."""
        return self.grid * self.grid

    @property
    def has_extra_token(self) -> bool:
        """Whether the LLM receives the extra token summarising the pruned patches."""
        return not self.passthrough

    def counts(self) -> dict[str, int]:
        """The token counts as a flat dict (JSON-ready)."""
        return {
            "tokens": self.num_tokens,
            "kept": len(self.kept),
            "outliers": len(self.outliers),
            "samples": len(self.samples),
            "extra": int(self.has_extra_token),
            "patches": self.num_patches,
            "pruned_to_kept": int((self.roles == ROLE_PRUNED_TO_KEPT).sum()),
            "pruned_to_extra": int((self.roles == ROLE_PRUNED_TO_EXTRA).sum()),
        }

    def to_dict(self) -> dict[str, Any]:
        """Counts and per-patch arrays as plain lists (JSON-ready)."""
        return {
            **self.counts(),
            "grid": self.grid,
            "fence": None if math.isnan(self.fence) else self.fence,
            "kept_indices": self.kept.tolist(),
            "outlier_indices": self.outliers.tolist(),
            "sample_indices": self.samples.tolist(),
            "merged_into": self.merged_into.tolist(),
            "roles": self.roles.tolist(),
        }


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"token maps need a square patch grid, got N = {num_patches} patches")
    return side


def token_map(reduced: ReducedTokens, index: int = 0) -> TokenMap:
    """The :class:`TokenMap` of image ``index`` of a batch reduced by ``reduce_tokens``.

    Uses ``reduced.kept_indices``, ``num_outliers``, ``merge_target`` and ``importance``.
    The attention outliers are the top ``num_outliers`` patches by class attention (stable
    descending order, as the selection), so the split into outliers and samples is the same
    whichever ``order`` the tokens were emitted in.

    Args:
        reduced: the reduction of B images (any device).
        index: which image, ``0 <= index < B``.
    """
    if not 0 <= index < reduced.batch_size:
        raise IndexError(f"image index {index} out of range for a batch of {reduced.batch_size}")
    attention = reduced.importance[index].detach().float().cpu()
    grid = _grid_side(attention.shape[0])
    n_patches = grid * grid
    kept = reduced.split_kept_indices()[index].detach().cpu().to(torch.int64)
    num_kept = reduced.host_num_kept[index]
    num_outliers = int(reduced.num_outliers[index])
    passthrough = num_outliers == 0 and num_kept == n_patches

    if num_outliers > 0:
        outliers = attention_order(attention.unsqueeze(0))[1][0, :num_outliers]
    else:
        outliers = torch.zeros(0, dtype=torch.int64)
    is_outlier = torch.zeros(n_patches, dtype=torch.bool)
    is_outlier[outliers] = True
    is_kept = torch.zeros(n_patches, dtype=torch.bool)
    is_kept[kept] = True
    samples = torch.nonzero(is_kept & ~is_outlier).flatten()

    # merge_target holds output positions (0..num_kept, num_kept = the extra token).
    position = reduced.merge_target[index].detach().cpu().to(torch.int64)
    lookup = torch.cat([kept, torch.tensor([EXTRA], dtype=torch.int64)])
    merged_into = lookup[position.clamp(max=num_kept)]

    roles = torch.where(merged_into == EXTRA, ROLE_PRUNED_TO_EXTRA, ROLE_PRUNED_TO_KEPT)
    if passthrough:
        roles = torch.full((n_patches,), ROLE_PASSTHROUGH)
        samples = torch.zeros(0, dtype=torch.int64)
    else:
        roles = torch.where(is_kept, ROLE_SAMPLE, roles)
        roles = torch.where(is_outlier, ROLE_OUTLIER, roles)
    return TokenMap(
        grid=grid,
        attention=attention.numpy(),
        fence=float(reduced.fence[index]),
        kept=kept.numpy(),
        outliers=outliers.numpy(),
        samples=samples.numpy(),
        merged_into=merged_into.numpy(),
        roles=roles.to(torch.int8).numpy(),
        num_tokens=reduced.host_lengths[index],
        passthrough=passthrough,
    )


def model_input_image(
    pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> Image.Image:
    """The image exactly as the vision tower saw it (resized, cropped), undoing normalisation.

    Args:
        pixel_values: ``[3, H, W]`` one preprocessed image.
        mean, std: the image processor's ``image_mean`` / ``image_std``.
    """
    if pixel_values.dim() != 3 or pixel_values.shape[0] != 3:
        raise ValueError(f"expected pixel values [3, H, W], got {tuple(pixel_values.shape)}")
    values = pixel_values.detach().float().cpu()
    values = values * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (values.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)  # uint8 [H, W, 3] is RGB


def _kept_colours(tmap: TokenMap) -> dict[int, tuple[float, float, float]]:
    """A colour per kept patch; neighbours on the grid get different hues where possible."""
    from matplotlib import colormaps

    palette = [colormaps["tab20"](i)[:3] for i in range(20)]
    palette += [colormaps["tab20b"](i)[:3] for i in range(20)]
    # Order by raster position, step through the palette with a stride coprime to its size so
    # adjacent kept tokens differ in colour.
    return {
        int(p): palette[(i * 7) % len(palette)] for i, p in enumerate(sorted(tmap.kept.tolist()))
    }


def _centre(patch: np.ndarray | int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    patch = np.asarray(patch)
    return patch % grid + 0.5, patch // grid + 0.5


def _square(ax, patch: int, grid: int, colour, width: float) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(
        Rectangle(
            (patch % grid + 0.06, patch // grid + 0.06),
            0.88,
            0.88,
            fill=False,
            edgecolor=colour,
            linewidth=width,
        )
    )


def draw_token_map(
    image: Image.Image, tmap: TokenMap, *, title: str | None = None, dpi: int = 100
) -> Figure:
    """Three panels over the ``grid x grid`` patches of ``image`` (the crop the tower saw).

    1. kept tokens: attention outliers (red squares) and spatial samples (cyan squares); pruned
       patches dimmed.
    2. merge map: every patch tinted with the colour of the kept token that absorbed it most
       strongly, with a line to it; patches held only by the extra token stay grey.
    3. class attention (log scale) with the IQR fence in the title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    grid = tmap.grid
    n_patches = tmap.num_patches
    picture = np.asarray(image.convert("RGB").resize((grid * 14, grid * 14)), dtype=np.float32)
    picture = picture / 255.0
    extent = (0, grid, grid, 0)
    fig = Figure(figsize=(16, 5.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax in axes:
        ax.set_xlim(0, grid)
        ax.set_ylim(grid, 0)
        ax.set_xticks(range(0, grid + 1, 4))
        ax.set_yticks(range(0, grid + 1, 4))
        ax.tick_params(labelsize=7)

    # Panel 1: which patches became tokens.
    ax = axes[0]
    ax.imshow(picture, extent=extent, interpolation="bilinear")
    kept_mask = np.isin(np.arange(n_patches), tmap.kept).reshape(grid, grid)
    shade = np.zeros((grid, grid, 4), dtype=np.float32)
    shade[..., 3] = np.where(kept_mask, 0.0, 0.55)
    ax.imshow(shade, extent=extent, interpolation="nearest")
    for k in range(grid + 1):
        ax.axhline(k, color="white", linewidth=0.2, alpha=0.5)
        ax.axvline(k, color="white", linewidth=0.2, alpha=0.5)
    if not tmap.passthrough:
        for p in tmap.samples.tolist():
            _square(ax, p, grid, "cyan", 1.2)
        for p in tmap.outliers.tolist():
            _square(ax, p, grid, "red", 1.8)
    ax.legend(
        handles=[
            Line2D(
                [],
                [],
                marker="s",
                linestyle="",
                markerfacecolor="none",
                markeredgecolor="red",
                label=f"outliers ({len(tmap.outliers)})",
            ),
            Line2D(
                [],
                [],
                marker="s",
                linestyle="",
                markerfacecolor="none",
                markeredgecolor="cyan",
                label=f"spatial samples ({len(tmap.samples)})",
            ),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.06),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.set_title("kept patches (pruned ones dimmed)", fontsize=10)

    # Panel 2: where each pruned patch went.
    ax = axes[1]
    ax.imshow(picture * 0.35 + 0.65, extent=extent, interpolation="bilinear")
    colours = _kept_colours(tmap)
    tint = np.zeros((n_patches, 4), dtype=np.float32)
    for p in range(n_patches):
        target = int(tmap.merged_into[p])
        if target == EXTRA:
            tint[p] = (0.5, 0.5, 0.5, 0.35)
        else:
            tint[p] = (*colours[target], 0.9 if target == p else 0.55)
    ax.imshow(tint.reshape(grid, grid, 4), extent=extent, interpolation="nearest")
    pruned = np.flatnonzero(
        (tmap.merged_into != EXTRA) & (tmap.merged_into != np.arange(n_patches))
    )
    if len(pruned) and not tmap.passthrough:
        x0, y0 = _centre(pruned, grid)
        x1, y1 = _centre(tmap.merged_into[pruned], grid)
        segments = np.stack([np.stack([x0, y0], -1), np.stack([x1, y1], -1)], 1)
        ax.add_collection(
            LineCollection(
                segments,
                colors=[colours[int(t)] for t in tmap.merged_into[pruned]],
                linewidths=0.6,
                alpha=0.8,
            )
        )
    if not tmap.passthrough:
        kx, ky = _centre(tmap.kept, grid)
        ax.scatter(
            kx,
            ky,
            s=14,
            c=[colours[int(p)] for p in tmap.kept],
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
        )
    counts = tmap.counts()
    ax.set_title(
        f"merge map: {counts['pruned_to_kept']} pruned -> strongest kept token, "
        f"{counts['pruned_to_extra']} extra-token only (grey)",
        fontsize=10,
    )

    # Panel 3: the score everything is based on.
    ax = axes[2]
    attention = tmap.attention.reshape(grid, grid)
    if np.isfinite(attention).any():
        positive = attention[attention > 0]
        low = float(positive.min()) if positive.size else 1e-12
        high = max(float(np.nanmax(attention)), low * 1.0001)
        shown = ax.imshow(
            np.clip(attention, low, None),
            extent=extent,
            cmap="viridis",
            norm=LogNorm(vmin=low, vmax=high),
            interpolation="nearest",
        )
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    for p in tmap.outliers.tolist():
        _square(ax, p, grid, "red", 1.2)
    fence = "" if math.isnan(tmap.fence) else f", IQR fence {tmap.fence:.3g}"
    ax.set_title(f"class attention (log scale{fence})", fontsize=10)

    summary = (
        f"{len(tmap.outliers)} outliers + {len(tmap.samples)} samples + "
        f"{int(tmap.has_extra_token)} extra = {tmap.num_tokens} tokens of {n_patches} patches"
        if not tmap.passthrough
        else f"mode off: all {n_patches} patches passed through"
    )
    fig.suptitle(f"{title}: {summary}" if title else summary, fontsize=12)
    return fig


def draw_count_histogram(
    counts: Mapping[str, Sequence[int]],
    *,
    num_patches: int | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Histogram of visual tokens per image, one series per label (e.g. per mode).

    Args:
        counts: label -> tokens per image (e.g. ``{"prumerge": [33, 41, ...]}``).
        num_patches: the stock model's tokens per image (576), quoted in the title.
        title: figure title; a default names the image count.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = {label: np.asarray(list(values)) for label, values in counts.items() if values}
    fig = Figure(figsize=(8, 4.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if series:
        everything = np.concatenate(list(series.values()))
        low, high = int(everything.min()), int(everything.max())
        bins = np.linspace(low - 0.5, high + 0.5, min(40, high - low + 1) + 1)
        for i, (label, values) in enumerate(series.items()):
            colour = f"C{i}"
            ax.hist(
                values,
                bins=bins,
                alpha=0.6,
                color=colour,
                label=f"{label}: mean {values.mean():.1f}, median {np.median(values):g}, "
                f"range {values.min()}-{values.max()}",
            )
            ax.axvline(values.mean(), color=colour, linestyle="--", linewidth=1)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("visual tokens per image (kept + extra)")
    ax.set_ylabel("images")
    images = max((len(v) for v in series.values()), default=0)
    default = f"visual tokens per image over {images} image(s)"
    if num_patches:
        default += f" (stock LLaVA: {num_patches})"
    ax.set_title(title or default, fontsize=11)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` as a PNG (parent folders created); returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return path
