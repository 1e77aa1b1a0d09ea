"""Finding and opening the images users point the benchmarks and examples at.

The one home of these for benchmarks, examples and tests (data URLs live in `media`).
"""

from __future__ import annotations

import io
import os
import urllib.request
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder` (by suffix, any case), sorted by name.

    Raises FileNotFoundError / NotADirectoryError with the path.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def open_image(source: str | os.PathLike):
    """Open and fully decode an image file or http(s) URL as RGB (PIL); ValueError naming the
    source and the reason on failure."""
    from PIL import Image

    try:
        if isinstance(source, str) and is_url(source):
            request = urllib.request.Request(source, headers={"User-Agent": "vllm-prumerge"})
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = io.BytesIO(response.read())
            with Image.open(payload) as image:
                image.load()
                return image.convert("RGB")
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image not found: {source}") from None
    except Exception as exc:  # network, undecodable, truncated or malformed data: many types
        raise ValueError(f"cannot read image {source}: {type(exc).__name__}: {exc}") from None
