"""Visualise which patches PruMerge kept, sampled and merged (no vLLM; matplotlib for drawing).

Two steps, so the numbers can be used without drawing anything:

1. :func:`token_map` turns one image (or crop) of a
   :class:`~vllm_prumerge.reduction.ReducedTokens` into a :class:`TokenMap`: plain NumPy arrays
   on the patch grid (kept outliers, spatial samples, and for every patch the kept token that
   absorbed it most strongly). :func:`total_counts` sums an image's crops.
2. :func:`draw_token_map` (one crop: LLaVA-1.5's 24x24 grid, SigLIP's 27x27),
   :func:`draw_anyres_token_maps` (every crop of a LLaVA-NeXT image, on the original image;
   :func:`anyres_placements` maps the crops back), :func:`draw_filmstrip` (every frame of a
   video, one column per frame) and :func:`draw_count_histogram` draw figures from those numbers;
   :func:`save_figure` writes a PNG.

    from vllm_prumerge.encoder import PruMergeEncoder
    from vllm_prumerge import vis
    encoded = encoder.encode(pixel_values, config)              # pixel_values [B, 3, 336, 336]
    tmap = vis.token_map(encoded.reduced, 0)
    image = vis.model_input_image(pixel_values[0], mean, std)   # the crop the tower saw
    vis.save_figure(vis.draw_token_map(image, tmap, title="prumerge+"), "tokens.png")

    # LLaVA-NeXT: the K crops of one image are rows 0..K-1 of the batch (base view first)
    tmaps = [vis.token_map(encoded.reduced, k) for k in range(K)]
    places = vis.anyres_placements(image.size, hf_config.image_grid_pinpoints)
    vis.save_figure(vis.draw_anyres_token_maps(image, places, tmaps), "tokens.png")

    # a video: its T frames are rows 0..T-1 of the batch, each reduced on its own
    tmaps = [vis.token_map(encoded.reduced, t) for t in range(T)]
    frames = [vis.model_input_image(pixel_values[t], mean, std) for t in range(T)]
    vis.save_figure(vis.draw_filmstrip(frames, tmaps), "tokens.png")

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
    "ROLE_UNCHANGED",
    "CropPlacement",
    "TokenMap",
    "anyres_placements",
    "draw_anyres_token_maps",
    "draw_count_histogram",
    "draw_filmstrip",
    "draw_token_map",
    "model_input_image",
    "save_figure",
    "token_map",
    "total_counts",
]

EXTRA = -1  # ``TokenMap.merged_into`` value of patches absorbed only by the extra token
UNCHANGED = -2  # ``TokenMap.merged_into`` value of patches a video's temporal stage dropped

# Patch roles of ``TokenMap.roles``.
ROLE_PRUNED_TO_EXTRA = 0  # pruned; no kept token chose it, so only the extra token holds it
ROLE_PRUNED_TO_KEPT = 1  # pruned; merged into a kept token (see ``merged_into``)
ROLE_SAMPLE = 2  # kept as a PruMerge+ / fixed-mode spatial sample
ROLE_OUTLIER = 3  # kept for its importance (IQR outlier, safeguard or fixed budget)
ROLE_PASSTHROUGH = 4  # mode "off": every patch passes through unchanged
ROLE_UNCHANGED = 5  # a video frame's patch dropped as unchanged across time (option temporal)
ROLE_NAMES = {
    ROLE_PRUNED_TO_EXTRA: "pruned -> extra token",
    ROLE_PRUNED_TO_KEPT: "pruned -> kept token",
    ROLE_SAMPLE: "spatial sample",
    ROLE_OUTLIER: "attention outlier",
    ROLE_PASSTHROUGH: "passed through (mode off)",
    ROLE_UNCHANGED: "dropped as unchanged (temporal)",
}


@dataclasses.dataclass(frozen=True)
class TokenMap:
    """Where one image's reduced tokens came from, on its ``grid x grid`` patch grid.

    Patch indices are row-major (``index = row * grid + column``), as CLIP orders them.

    Attributes:
        grid: patches per side (24 for CLIP-L/14-336, 27 for SigLIP 384/14).
        attention: ``[N]`` float32 importance of the patches (class or received attention;
            NaN in mode ``"off"`` when none was computed).
        fence: the image's IQR upper fence (NaN unless the mode is adaptive).
        kept: ``[num_kept]`` int64 patch index of each kept output token, in output order.
        outliers: ``[num_outliers]`` int64 patches kept for their importance, in descending
            importance (IQR outliers after the ``min_tokens`` safeguard, or the fixed budget).
        samples: ``[num_kept - num_outliers]`` int64 spatial samples, ascending.
        merged_into: ``[N]`` int64, per patch the patch index of the kept token that absorbed it
            most strongly: itself for a kept patch, :data:`EXTRA` (-1) for a pruned patch that no
            kept token chose (it lives on only in the extra token), :data:`UNCHANGED` (-2) for a
            patch the temporal stage dropped (its frame's reduction never saw it).
        roles: ``[N]`` int8, one of the ``ROLE_*`` codes per patch.
        num_tokens: tokens the LLM receives for this image (kept + extra; ``N`` in mode off;
            0 for a video frame whose every patch was dropped as unchanged).
        passthrough: True in mode ``"off"`` (nothing reduced, no extra token).
        importance_name: what ``attention`` holds, for titles: ``"class attention"`` (CLIP's
            CLS row, the reference) or ``"received attention"`` (CLS-free towers such as SigLIP).
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
    importance_name: str = "class attention"

    @property
    def num_patches(self) -> int:
        """N, the patches of the stock model (``grid ** 2``)."""
        return self.grid * self.grid

    @property
    def has_extra_token(self) -> bool:
        """Whether the LLM receives the extra token summarising the pruned patches (none in
        mode off, nor for a frame that kept no patch)."""
        return not self.passthrough and self.num_tokens > 0

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
            "unchanged": int((self.roles == ROLE_UNCHANGED).sum()),
        }

    def to_dict(self) -> dict[str, Any]:
        """Counts and per-patch arrays as plain lists (JSON-ready)."""
        return {
            **self.counts(),
            "grid": self.grid,
            "importance": self.importance_name,
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


def token_map(
    reduced: ReducedTokens, index: int = 0, *, importance_name: str = "class attention"
) -> TokenMap:
    """The :class:`TokenMap` of image (or crop) ``index`` of a batch reduced by
    ``reduce_tokens`` / ``reduce_by_importance``.

    Uses ``reduced.kept_indices``, ``num_outliers``, ``merge_target`` and ``importance``; a
    video frame reduced after the temporal stage (``reduce_frames``) has ``merge_target`` -1 at
    the patches dropped as unchanged: role :data:`ROLE_UNCHANGED`.
    The attention outliers are the top ``num_outliers`` patches by importance (stable
    descending order, as the selection), so the split into outliers and samples is the same
    whichever ``order`` the tokens were emitted in.

    Args:
        reduced: the reduction of B images or crops (any device).
        index: which one, ``0 <= index < B``.
        importance_name: what ``reduced.importance`` is, for figure titles (see
            :attr:`TokenMap.importance_name`).
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
    unchanged = position < 0
    lookup = torch.cat([kept, torch.tensor([EXTRA], dtype=torch.int64)])
    merged_into = torch.where(unchanged, UNCHANGED, lookup[position.clamp(0, num_kept)])

    roles = torch.where(merged_into == EXTRA, ROLE_PRUNED_TO_EXTRA, ROLE_PRUNED_TO_KEPT)
    if passthrough:
        roles = torch.full((n_patches,), ROLE_PASSTHROUGH)
        samples = torch.zeros(0, dtype=torch.int64)
    else:
        roles = torch.where(is_kept, ROLE_SAMPLE, roles)
        roles = torch.where(is_outlier, ROLE_OUTLIER, roles)
        roles = torch.where(unchanged, ROLE_UNCHANGED, roles)
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
        importance_name=importance_name,
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


@dataclasses.dataclass(frozen=True)
class CropPlacement:
    """Where one crop's ``grid x grid`` patches lie on the picture they are drawn on.

    Patch ``p`` (row-major: row ``p // grid``, column ``p % grid``, as the towers order them)
    covers ``x in [left + column * cell_width, left + (column + 1) * cell_width)`` and
    ``y in [top + row * cell_height, top + (row + 1) * cell_height)``, in the picture's
    coordinates. A box may reach past the picture: a LLaVA-NeXT tile over the processor's
    padding covers no pixel of the image.

    Attributes:
        grid: patches per side (24 for CLIP-L/14-336, 27 for SigLIP 384/14).
        left, top: the picture coordinates of the crop's patch grid's top-left corner.
        cell_width, cell_height: one patch's size in picture coordinates.
        label: a name for the crop ("base view", "tile (0, 1)", ...).
    """

    grid: int
    left: float
    top: float
    cell_width: float
    cell_height: float
    label: str = "crop"

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` of the patch grid, matplotlib's ``imshow`` order."""
        right = self.left + self.grid * self.cell_width
        bottom = self.top + self.grid * self.cell_height
        return (self.left, right, bottom, self.top)

    def patch_origin(self, patches: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corners ``(x [P], y [P])`` of the patches' boxes."""
        patches = np.asarray(patches)
        return (
            self.left + (patches % self.grid) * self.cell_width,
            self.top + (patches // self.grid) * self.cell_height,
        )

    def patch_centre(self, patches: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Centres ``(x [P], y [P])`` of the patches' boxes."""
        x, y = self.patch_origin(patches)
        return x + 0.5 * self.cell_width, y + 0.5 * self.cell_height

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def anyres_placements(
    image_size: tuple[int, int],
    grid_pinpoints: Sequence[Sequence[int]],
    *,
    crop_size: int = 336,
    patch_size: int = 14,
) -> list[CropPlacement]:
    """Where each crop of a LLaVA-NeXT (anyres) image lies on the original image.

    The crops in the image processor's order (transformers' ``LlavaNextImageProcessor``):

    1. the base view: the whole image resized to ``crop_size x crop_size`` (aspect not kept),
       so its patch grid spans the whole image;
    2. the tiles: the image resized, aspect kept, to fit the best pinpoint resolution
       (transformers' ``select_best_resolution``; the fitted side fills the pinpoint, the other is
       ``ceil(side * scale)``), centred on a pinpoint-sized canvas padded with zeros, and cut
       into ``crop_size`` tiles in row-major order; each tile's grid is mapped back through that
       resize and padding (tiles may reach past the image over the padding).

    Args:
        image_size: ``(width, height)`` of the original image, in pixels.
        grid_pinpoints: the checkpoint's ``image_grid_pinpoints``, ``[[height, width], ...]``.
        crop_size: the processor's crop side (336 for LLaVA-NeXT's CLIP-L/14-336).
        patch_size: the tower's patch side (14).

    Returns:
        ``1 + rows * cols`` placements in original-image pixels: base view, then the tiles.
    """
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    from transformers.image_processing_utils import select_best_resolution

    grid = crop_size // patch_size
    best = select_best_resolution((height, width), [tuple(p) for p in grid_pinpoints])
    if best is None:
        raise ValueError(f"no usable grid pinpoint in {list(grid_pinpoints)}")
    pin_height, pin_width = best
    scale_w, scale_h = pin_width / width, pin_height / height
    if scale_w < scale_h:
        new_width, new_height = pin_width, min(math.ceil(height * scale_w), pin_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), pin_width), pin_height
    pad_x, pad_y = (pin_width - new_width) // 2, (pin_height - new_height) // 2
    # Canvas pixel -> original pixel: x = (x_canvas - pad_x) * width / new_width.
    to_x, to_y = width / new_width, height / new_height
    placements = [CropPlacement(grid, 0.0, 0.0, width / grid, height / grid, label="base view")]
    for row in range(pin_height // crop_size):
        for col in range(pin_width // crop_size):
            placements.append(
                CropPlacement(
                    grid,
                    (col * crop_size - pad_x) * to_x,
                    (row * crop_size - pad_y) * to_y,
                    patch_size * to_x,
                    patch_size * to_y,
                    label=f"tile ({row}, {col})",
                )
            )
    return placements


def total_counts(tmaps: Sequence[TokenMap]) -> dict[str, int]:
    """The :meth:`TokenMap.counts` of an image's crops, summed, plus ``crops``: what the LLM
    receives for the whole image in a reduced mode (each crop's kept tokens + its extra)."""
    totals: dict[str, int] = {}
    for tmap in tmaps:
        for key, value in tmap.counts().items():
            totals[key] = totals.get(key, 0) + value
    totals["crops"] = len(tmaps)
    return totals


def _kept_colours(tmap: TokenMap, offset: int = 0) -> dict[int, tuple[float, float, float]]:
    """A colour per kept patch; neighbours on the grid get different hues where possible.
    ``offset``: kept tokens already coloured in the same panel (other crops)."""
    from matplotlib import colormaps

    palette = [colormaps["tab20"](i)[:3] for i in range(20)]
    palette += [colormaps["tab20b"](i)[:3] for i in range(20)]
    # Order by raster position, step through the palette with a stride coprime to its size so
    # adjacent kept tokens differ in colour.
    return {
        int(p): palette[((offset + i) * 7) % len(palette)]
        for i, p in enumerate(sorted(tmap.kept.tolist()))
    }


# One crop of a panel: where its grid lies, and its token map.
_Crop = tuple[CropPlacement, TokenMap]


UNCHANGED_TINT = (1.0, 0.55, 0.0, 0.6)  # orange: dropped as unchanged across time


def _squares(ax, place: CropPlacement, patches: np.ndarray, colour, width: float) -> None:
    """One open square per patch, inset from the patch's box."""
    from matplotlib.patches import Rectangle

    x, y = place.patch_origin(patches)
    inset_w, inset_h = 0.06 * place.cell_width, 0.06 * place.cell_height
    for x0, y0 in zip(x.tolist(), y.tolist(), strict=True):
        ax.add_patch(
            Rectangle(
                (x0 + inset_w, y0 + inset_h),
                0.88 * place.cell_width,
                0.88 * place.cell_height,
                fill=False,
                edgecolor=colour,
                linewidth=width,
            )
        )


def _grid_lines(ax, place: CropPlacement, colour, width: float, alpha: float) -> None:
    from matplotlib.collections import LineCollection

    left, right, bottom, top = place.extent
    steps = np.arange(place.grid + 1)
    xs = left + steps * place.cell_width
    ys = top + steps * place.cell_height
    segments = [[(x, top), (x, bottom)] for x in xs] + [[(left, y), (right, y)] for y in ys]
    ax.add_collection(LineCollection(segments, colors=colour, linewidths=width, alpha=alpha))


def _frame(ax, place: CropPlacement, colour, width: float) -> None:
    from matplotlib.patches import Rectangle

    left, right, bottom, top = place.extent
    ax.add_patch(
        Rectangle(
            (left, top), right - left, bottom - top, fill=False, edgecolor=colour, linewidth=width
        )
    )


def _kept_legend(counts: Sequence[tuple[str, str, int | None]]) -> list:
    """Legend handles of the kept-token squares: (colour, name, count or None) each."""
    from matplotlib.lines import Line2D

    return [
        Line2D(
            [],
            [],
            marker="s",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor=colour,
            label=name if count is None else f"{name} ({count})",
        )
        for colour, name, count in counts
    ]


def _draw_kept(
    ax, picture: np.ndarray, extent, crops: Sequence[_Crop], *, legend: bool = True
) -> None:
    """Kept tokens: outliers (red squares), spatial samples (cyan squares), pruned dimmed,
    patches dropped as unchanged across time tinted orange."""
    ax.imshow(picture, extent=extent, interpolation="bilinear")
    outliers = samples = 0
    for place, tmap in crops:
        grid = tmap.grid
        kept_mask = np.isin(np.arange(tmap.num_patches), tmap.kept).reshape(grid, grid)
        shade = np.zeros((grid, grid, 4), dtype=np.float32)
        shade[..., 3] = np.where(kept_mask, 0.0, 0.55)
        unchanged = (tmap.roles == ROLE_UNCHANGED).reshape(grid, grid)
        shade[unchanged] = UNCHANGED_TINT
        ax.imshow(shade, extent=place.extent, interpolation="nearest")
        _grid_lines(ax, place, "white", 0.2, 0.5)
        if not tmap.passthrough:
            _squares(ax, place, tmap.samples, "cyan", 1.2)
            _squares(ax, place, tmap.outliers, "red", 1.8)
            outliers += len(tmap.outliers)
            samples += len(tmap.samples)
    if not legend:
        return
    ax.legend(
        handles=_kept_legend([("red", "outliers", outliers), ("cyan", "spatial samples", samples)]),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.06),
        ncol=2,
        fontsize=8,
        frameon=False,
    )


def _draw_merge(ax, picture: np.ndarray, extent, crops: Sequence[_Crop]) -> dict[str, int]:
    """Merge map: every patch tinted with the colour of the kept token that absorbed it most
    strongly (a line to it); grey: only the extra token holds it; orange: dropped as unchanged
    across time. Returns the counts drawn."""
    from matplotlib.collections import LineCollection

    ax.imshow(picture * 0.35 + 0.65, extent=extent, interpolation="bilinear")
    drawn = {"pruned_to_kept": 0, "pruned_to_extra": 0}
    offset = 0
    for place, tmap in crops:
        n_patches, grid = tmap.num_patches, tmap.grid
        colours = _kept_colours(tmap, offset)
        offset += len(tmap.kept)
        tint = np.zeros((n_patches, 4), dtype=np.float32)
        for p in range(n_patches):
            target = int(tmap.merged_into[p])
            if target == EXTRA:
                tint[p] = (0.5, 0.5, 0.5, 0.35)
            elif target == UNCHANGED:
                tint[p] = UNCHANGED_TINT
            else:
                tint[p] = (*colours[target], 0.9 if target == p else 0.55)
        ax.imshow(tint.reshape(grid, grid, 4), extent=place.extent, interpolation="nearest")
        if tmap.passthrough:
            continue
        pruned = np.flatnonzero(
            (tmap.merged_into >= 0) & (tmap.merged_into != np.arange(n_patches))
        )
        if len(pruned):
            x0, y0 = place.patch_centre(pruned)
            x1, y1 = place.patch_centre(tmap.merged_into[pruned])
            segments = np.stack([np.stack([x0, y0], -1), np.stack([x1, y1], -1)], 1)
            ax.add_collection(
                LineCollection(
                    segments,
                    colors=[colours[int(t)] for t in tmap.merged_into[pruned]],
                    linewidths=0.6,
                    alpha=0.8,
                )
            )
        kx, ky = place.patch_centre(tmap.kept)
        ax.scatter(
            kx,
            ky,
            s=14,
            c=[colours[int(p)] for p in tmap.kept],
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
        )
        drawn["pruned_to_kept"] += len(pruned)
        drawn["pruned_to_extra"] += int((tmap.merged_into == EXTRA).sum())
    return drawn


def _draw_importance(fig, ax, crops: Sequence[_Crop]) -> None:
    """The importance (log scale, one colour scale for all crops), outliers in red."""
    from matplotlib.colors import LogNorm

    values = np.concatenate([tmap.attention for _, tmap in crops])
    if np.isfinite(values).any():
        positive = values[values > 0]
        low = float(positive.min()) if positive.size else 1e-12
        high = max(float(np.nanmax(values)), low * 1.0001)
        norm = LogNorm(vmin=low, vmax=high)
        for place, tmap in crops:
            attention = tmap.attention.reshape(tmap.grid, tmap.grid)
            shown = ax.imshow(
                np.clip(attention, low, None),
                extent=place.extent,
                cmap="viridis",
                norm=norm,
                interpolation="nearest",
            )
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    for place, tmap in crops:
        _squares(ax, place, tmap.outliers, "red", 1.2)
    fences = [tmap.fence for _, tmap in crops if not math.isnan(tmap.fence)]
    if len(fences) == 1:
        fence = f", IQR fence {fences[0]:.3g}"
    elif fences:
        fence = f", IQR fences {min(fences):.3g}-{max(fences):.3g}"
    else:
        fence = ""
    name = crops[0][1].importance_name
    ax.set_title(f"{name} (log scale{fence})", fontsize=10)


def _summary(counts: Mapping[str, int], passthrough: bool) -> str:
    if passthrough:
        return f"mode off: all {counts['patches']} patches passed through"
    return (
        f"{counts['outliers']} outliers + {counts['samples']} samples + {counts['extra']} extra "
        f"= {counts['tokens']} tokens of {counts['patches']} patches"
    )


def _picture(image: Image.Image, width: float, height: float) -> tuple[np.ndarray, tuple]:
    """``[H, W, 3]`` float RGB in [0, 1] and its ``imshow`` extent ``(0, width, height, 0)``."""
    picture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return picture, (0.0, width, height, 0.0)


def _patch_picture(
    image: Image.Image, grid: int, patch_size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """``image`` (the crop or frame the tower saw) on a ``grid x grid`` axis in patches, at
    ``patch_size`` pixels per patch (stretched over the grid when smaller)."""
    covered = grid * patch_size
    if image.width < covered or image.height < covered:
        image = image.resize((covered, covered))
    return _picture(image, image.width / patch_size, image.height / patch_size)


def _limit(ax, left: float, right: float, bottom: float, top: float) -> None:
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.tick_params(labelsize=7)


def draw_token_map(
    image: Image.Image,
    tmap: TokenMap,
    *,
    title: str | None = None,
    dpi: int = 100,
    patch_size: int = 14,
) -> Figure:
    """Three panels over the ``grid x grid`` patches of ``image`` (the crop the tower saw).

    1. kept tokens: attention outliers (red squares) and spatial samples (cyan squares); pruned
       patches dimmed.
    2. merge map: every patch tinted with the colour of the kept token that absorbed it most
       strongly, with a line to it; patches held only by the extra token stay grey.
    3. the importance (class or received attention, log scale) with the IQR fence in the title.

    Axes are in patches. ``image`` is drawn at ``patch_size`` pixels per patch, so a tower input
    larger than the grid (SigLIP: 384 px, 27 x 14 = 378 px of patches) shows exactly the pixels
    the patches cover; an image smaller than the grid is stretched over it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = tmap.grid
    picture, extent = _patch_picture(image, grid, patch_size)
    crops = [(CropPlacement(grid, 0.0, 0.0, 1.0, 1.0, label="image"), tmap)]
    fig = Figure(figsize=(16, 5.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax in axes:
        _limit(ax, 0, grid, grid, 0)
        ax.set_xticks(range(0, grid + 1, 4))
        ax.set_yticks(range(0, grid + 1, 4))

    _draw_kept(axes[0], picture, extent, crops)
    axes[0].set_title("kept patches (pruned ones dimmed)", fontsize=10)
    drawn = _draw_merge(axes[1], picture, extent, crops)
    axes[1].set_title(
        f"merge map: {drawn['pruned_to_kept']} pruned -> strongest kept token, "
        f"{drawn['pruned_to_extra']} extra-token only (grey)",
        fontsize=10,
    )
    _draw_importance(fig, axes[2], crops)
    summary = _summary(tmap.counts(), tmap.passthrough)
    fig.suptitle(f"{title}: {summary}" if title else summary, fontsize=12)
    return fig


def draw_anyres_token_maps(
    image: Image.Image,
    placements: Sequence[CropPlacement],
    tmaps: Sequence[TokenMap],
    *,
    title: str | None = None,
    stock_tokens: int | None = None,
    dpi: int = 100,
) -> Figure:
    """Every crop of a LLaVA-NeXT (anyres) image, drawn on the original image: two rows of the
    three panels of :func:`draw_token_map`.

    Row 1, the base view (its grid spans the whole image); row 2, the high-resolution tiles, each
    tile's grid mapped back onto the image region it covers (yellow frames; the light grey
    beyond the image is the processor's padding).

    Args:
        image: the original image (any size).
        placements: :func:`anyres_placements` of the image: base view first, then the tiles.
        tmaps: one :class:`TokenMap` per crop, in the same order.
        title: prefix of the figure title.
        stock_tokens: the stock model's tokens for this image (quoted in the title if given).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(placements) != len(tmaps) or len(tmaps) < 2:
        raise ValueError(
            "draw_anyres_token_maps needs the base view and at least one tile, with one token "
            f"map per placement: got {len(placements)} placements, {len(tmaps)} token maps"
        )
    width, height = image.size
    picture, extent = _picture(image, width, height)
    rows = [
        ("base view", list(zip(placements[:1], tmaps[:1], strict=True))),
        ("tiles", list(zip(placements[1:], tmaps[1:], strict=True))),
    ]
    aspect = height / width
    fig = Figure(
        figsize=(16, 2 * max(3.0, 5.3 * min(aspect, 1.6)) + 0.8), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for (name, crops), row in zip(rows, axes, strict=True):
        lefts, rights, bottoms, tops = zip(*(place.extent for place, _ in crops), strict=True)
        bounds = (min(0.0, *lefts), max(width, *rights), max(height, *bottoms), min(0.0, *tops))
        for ax in row:
            _limit(ax, *bounds)
            ax.set_facecolor("0.85")
        counts = total_counts([tmap for _, tmap in crops])
        passthrough = all(tmap.passthrough for _, tmap in crops)
        grid = crops[0][1].grid
        label = name if name == "base view" else f"{len(crops)} tiles, {grid}x{grid} patches each"
        _draw_kept(row[0], picture, extent, crops)
        row[0].set_title(f"{label}\n{_summary(counts, passthrough)}", fontsize=9)
        drawn = _draw_merge(row[1], picture, extent, crops)
        row[1].set_title(
            f"merge map\n{drawn['pruned_to_kept']} pruned -> strongest kept token, "
            f"{drawn['pruned_to_extra']} extra-token only (grey)",
            fontsize=9,
        )
        _draw_importance(fig, row[2], crops)
        if name != "base view":
            for ax in row:
                for place, _ in crops:
                    _frame(ax, place, "yellow", 1.5)
    stock_note = "stock (unpadded, one newline per row)"
    fig.suptitle(_totals_title(title, tmaps, "crops", stock_tokens, stock_note), fontsize=12)
    return fig


def _totals_title(
    title: str | None,
    tmaps: Sequence[TokenMap],
    unit: str,
    stock_tokens: int | None,
    stock_note: str = "stock",
) -> str:
    """A figure title with the totals over several token maps (an image's crops, a video's
    frames, named by ``unit``) and the stock count if given."""
    totals = total_counts(tmaps)
    if all(tmap.passthrough for tmap in tmaps):
        summary = f"mode off: {len(tmaps)} {unit} passed through"
        if stock_tokens is not None:
            summary += f" = {stock_tokens} tokens {stock_note}"
    else:
        summary = (
            f"{len(tmaps)} {unit}: {totals['outliers']} outliers + {totals['samples']} "
            f"samples + {totals['extra']} extra = {totals['tokens']} tokens"
        )
        if stock_tokens is not None:
            summary += f" (stock: {stock_tokens})"
        if totals.get("unchanged"):
            summary += f"; {totals['unchanged']} patches dropped as unchanged"
    return f"{title}: {summary}" if title else summary


def draw_filmstrip(
    frames: Sequence[Image.Image],
    tmaps: Sequence[TokenMap],
    *,
    title: str | None = None,
    stock_tokens: int | None = None,
    patch_size: int = 14,
    dpi: int = 100,
) -> Figure:
    """A video's frames as a filmstrip: one column per frame in time order, each frame reduced
    on its own (kept + its extra token), after the temporal stage where one ran.

    Row 1, kept patches (the first panel of :func:`draw_token_map`: attention outliers red,
    spatial samples cyan, pruned patches dimmed, patches dropped as unchanged across time
    orange); row 2, the merge map (each patch tinted with the kept token of its frame that
    absorbed it most strongly, grey: extra token only, orange: unchanged). Each
    column's title gives that frame's counts; the figure's title the video's total.

    Args:
        frames: the frames as the tower saw them (e.g. :func:`model_input_image` of each).
        tmaps: one :class:`TokenMap` per frame, in the same order.
        title: prefix of the figure title.
        stock_tokens: the stock model's tokens for this video (quoted in the title if given).
        patch_size: the tower's patch side in pixels of ``frames``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(frames) != len(tmaps) or not tmaps:
        raise ValueError(
            "draw_filmstrip needs one token map per frame and at least one frame: got "
            f"{len(frames)} frames, {len(tmaps)} token maps"
        )
    count = len(tmaps)
    fig = Figure(figsize=(max(6.0, 2.6 * count), 6.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(2, count, squeeze=False))
    for t, (frame, tmap) in enumerate(zip(frames, tmaps, strict=True)):
        grid = tmap.grid
        picture, extent = _patch_picture(frame, grid, patch_size)
        crops = [(CropPlacement(grid, 0.0, 0.0, 1.0, 1.0, label=f"frame {t}"), tmap)]
        for ax in axes[:, t]:
            _limit(ax, 0, grid, grid, 0)
            ax.set_xticks([])
            ax.set_yticks([])
        _draw_kept(axes[0, t], picture, extent, crops, legend=False)
        counts = tmap.counts()
        if tmap.passthrough:
            axes[0, t].set_title(f"frame {t}: {counts['patches']} patches (off)", fontsize=8)
        else:
            label = (
                f"frame {t}: {counts['outliers']} + {counts['samples']} + {counts['extra']} "
                f"= {counts['tokens']}"
            )
            if counts["unchanged"]:
                label += f"\n{counts['unchanged']} unchanged"
            axes[0, t].set_title(label, fontsize=8)
        drawn = _draw_merge(axes[1, t], picture, extent, crops)
        axes[1, t].set_title(
            f"{drawn['pruned_to_kept']} merged, {drawn['pruned_to_extra']} extra only", fontsize=8
        )
    keys = [("red", "attention outlier", None), ("cyan", "spatial sample", None)]
    if any(tmap.counts()["unchanged"] for tmap in tmaps):
        keys.append(("darkorange", "unchanged across time (dropped)", None))
    fig.legend(
        handles=_kept_legend(keys),
        loc="outside lower center",
        ncol=len(keys),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(_totals_title(title, tmaps, "frames", stock_tokens), fontsize=11)
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
