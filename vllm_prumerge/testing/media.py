"""Media as vLLM users send it: OpenAI `data:` URLs for images and videos; video files read back.

The one home of these helpers for tests, benchmarks and examples.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import tempfile

import numpy as np
from PIL import Image

from vllm_prumerge.testing.images import is_url


def image_data_url(image: Image.Image, format: str = "PNG") -> str:
    """A `data:` URL of the image for an OpenAI `image_url` content part (lossless PNG)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def file_url(source: str) -> str:
    """An http(s) URL as it is, else a `data:` URL of the file's bytes for a `video_url` part
    (type from the file's name; video/mp4 when it says nothing)."""
    if is_url(source):
        return source
    kind = mimetypes.guess_type(source)[0] or "video/mp4"
    with open(source, "rb") as file:
        return f"data:{kind};base64," + base64.b64encode(file.read()).decode()


def encode_mp4(frames: np.ndarray, fps: float = 2.0) -> bytes:
    """Encode frames `[T, H, W, 3]` (uint8 RGB) as an MP4 (OpenCV's `mp4v` codec, lossy).

    Decoded frames differ from the source pixels: compare server counts with the frames the
    server decoded, not with `frames`.
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV could not open an mp4v VideoWriter")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        with open(path, "rb") as f:
            return f.read()


def decode_mp4(data: bytes) -> np.ndarray:
    """Every frame of an MP4's bytes, `[T, H, W, 3]` uint8 RGB, decoded in order by OpenCV (the
    backend vLLM's video loader uses by default): the pixels a server sees for a short clip."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        with open(path, "wb") as f:
            f.write(data)
        return read_video(path)


def video_data_url(frames: np.ndarray, fps: float = 2.0) -> str:
    """A `data:video/mp4` URL of the frames `[T, H, W, 3]` for an OpenAI `video_url` part."""
    return "data:video/mp4;base64," + base64.b64encode(encode_mp4(frames, fps)).decode()


def read_video(path: str | os.PathLike, num_frames: int | None = None) -> np.ndarray:
    """The frames of a video file (MP4, ...; OpenCV) as uint8 RGB `[T, H, W, 3]`: every frame,
    or `num_frames` spread evenly over the clip when it has more (first and last included, as
    vLLM's `opencv` video loader picks them)."""
    import cv2

    capture = cv2.VideoCapture(os.fspath(path))
    try:
        if not capture.isOpened():
            raise ValueError(f"cannot open video {path}")
        decoded = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            decoded.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not decoded:
        raise ValueError(f"no frames in video {path}")
    if num_frames is not None and 0 < num_frames < len(decoded):
        picks = np.linspace(0, len(decoded) - 1, num_frames, dtype=int)
        decoded = [decoded[i] for i in picks]
    return np.stack(decoded)
