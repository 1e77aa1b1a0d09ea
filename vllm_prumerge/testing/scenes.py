"""Synthetic scene images: shapes, text and gradients of varied complexity, deterministic by seed;
and videos of them (a camera panning across one scene).

I.i.d. noise gives an unrepresentative, nearly uniform class attention; these scenes have
structure (flat regions, edges, small salient objects), so token counts vary from image to image.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_WORDS = ["STOP", "EXIT", "CAFE", "42", "OPEN", "SALE", "vLLM", "LLaVA", "PRUNE", "MERGE", "A", "Z"]


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def make_scene(
    seed: int, size: tuple[int, int] = (336, 336), complexity: int | None = None
) -> Image.Image:
    """Draw one RGB scene of `size` (width, height).

    `complexity` (0..10, default drawn from the seed) sets how many objects and text labels appear:
    0 is a plain gradient, 10 a busy scene.
    """
    rng = random.Random(seed)
    w, h = size
    level = rng.randrange(11) if complexity is None else max(0, min(10, complexity))
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)

    c0, c1 = _colour(rng), _colour(rng)
    vertical = rng.random() < 0.5
    steps = h if vertical else w
    for i in range(steps):
        t = i / max(1, steps - 1)
        c = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1, strict=True))
        if vertical:
            draw.line([(0, i), (w, i)], fill=c)
        else:
            draw.line([(i, 0), (i, h)], fill=c)

    for _ in range(level * 2):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        s = rng.randrange(max(4, min(w, h) // 30), max(8, min(w, h) // 4))
        box = [x0, y0, x0 + s, y0 + int(s * rng.uniform(0.5, 1.5))]
        kind = rng.randrange(4)
        fill = _colour(rng)
        if kind == 0:
            draw.rectangle(box, fill=fill)
        elif kind == 1:
            draw.ellipse(box, fill=fill, outline=_colour(rng), width=rng.randrange(1, 4))
        elif kind == 2:
            draw.polygon([(x0, y0 + s), (x0 + s // 2, y0), (x0 + s, y0 + s)], fill=fill)
        else:
            draw.line(box, fill=fill, width=rng.randrange(1, 6))

    for _ in range(level // 2):
        x, y = rng.randrange(max(1, w - 40)), rng.randrange(max(1, h - 12))
        draw.text((x, y), rng.choice(_WORDS), fill=_colour(rng))

    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0)))
    return img


def make_scenes(count: int, seed: int = 0, size: tuple[int, int] = (336, 336)) -> list[Image.Image]:
    """`count` scenes of increasing seed, complexities spread over 0..10."""
    return [make_scene(seed * 100_003 + i, size=size) for i in range(count)]


VIDEO_KINDS = ("panning", "static", "cut")


def make_video(
    seed: int,
    frames: int,
    size: tuple[int, int] = (336, 336),
    pan: int = 12,
    kind: str = "panning",
) -> np.ndarray:
    """A video of `frames` frames of `size` (width, height), uint8 `[T, H, W, 3]`, the layout
    vLLM takes as `multi_modal_data={"video": frames}`. `kind`:

    - "panning": a camera panning right by `pan` pixels per frame across one scene
      (`make_scene(seed)`, drawn wide enough for the pan);
    - "static": one scene (`make_scene(seed)`) held for every frame;
    - "cut": one scene held for the first `ceil(frames / 2)` frames, then a scene cut to
      another (`make_scene(seed + 1)`) held for the rest.
    """
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got {frames}")
    if kind not in VIDEO_KINDS:
        raise ValueError(f"video kind must be one of {', '.join(VIDEO_KINDS)}, got {kind!r}")
    width, height = size
    if kind != "panning":
        first = np.asarray(make_scene(seed, size=size))
        if kind == "static":
            return np.stack([first] * frames)
        second = np.asarray(make_scene(seed + 1, size=size))
        before = (frames + 1) // 2
        return np.stack([first] * before + [second] * (frames - before))
    wide = np.asarray(make_scene(seed, size=(width + pan * (frames - 1), height)))
    return np.stack([wide[:, pan * t : pan * t + width] for t in range(frames)])
