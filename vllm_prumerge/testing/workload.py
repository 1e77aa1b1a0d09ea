"""The benchmark workload, shared by the benchmark scripts and the tests that check them:
generated checkpoints of preset sizes, and requests (an image or a video, a question of varied
length), deterministic in a seed. Imports neither vLLM nor matplotlib.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from vllm_prumerge.testing.checkpoint import FAMILIES

__all__ = [
    "FAMILIES",
    "QUESTIONS",
    "SYNTHETIC_SPECS",
    "TOWERS",
    "WorkItem",
    "build_workload",
    "load_images",
    "load_videos",
    "synthetic_checkpoint",
]

# Text model and tower sizes of the generated checkpoints (--synthetic): "tiny" is the test
# fixture, where fixed per-request overheads dominate on a CPU; "small" has a text model large
# enough that prompt length shows in the cost on a CPU; "medium" ~8x small's per token, for
# LLM-bound workloads. All keep the family's real image geometry (336 px / 14: 576 patches +
# CLS; SigLIP 384 px: 729 patches); `tower="real"` also gives the tower its production size.
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
    """(folder, spec fields) of the generated checkpoint of preset `size` (SYNTHETIC_SPECS) and
    `family`, with the family's production tower shape when `tower` is "real"; made once and
    cached under ~/.cache/vllm-prumerge."""
    from vllm_prumerge.testing.checkpoint import TinyLlavaSpec
    from vllm_prumerge.testing.engine_args import resolve_model
    from vllm_prumerge.testing.towers import FAMILY_TOWERS, spec_fields

    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    fields = dict(SYNTHETIC_SPECS[size])
    if tower == "real":
        if family not in FAMILY_TOWERS:
            raise ValueError(f"no production tower shape is known for family {family!r}")
        fields.update(spec_fields(FAMILY_TOWERS[family]))
    spec = TinyLlavaSpec(family=family, **fields)
    return resolve_model(None, spec), dataclasses.asdict(spec)


def load_images(
    count: int, seed: int, images_dir: str | None = None, *, start: int = 0, size=(336, 336)
) -> list[Any]:
    """`count` RGB images: generated scenes of `size` (width, height; scene number
    seed * 100_003 + index), or the files of `images_dir` in name order, cycled; `start` skips
    that many."""
    if images_dir:
        from vllm_prumerge.testing.images import IMAGE_SUFFIXES, find_images, open_image

        files = find_images(images_dir)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
        return [open_image(files[i % len(files)]) for i in range(start, start + count)]
    from vllm_prumerge.testing.scenes import make_scene

    return [make_scene(seed * 100_003 + i, size=size) for i in range(start, start + count)]


def load_videos(
    count: int,
    seed: int,
    frames: int,
    images_dir: str | None = None,
    *,
    start: int = 0,
    size=(336, 336),
    kind: str = "panning",
) -> list[Any]:
    """`count` videos of `frames` frames, uint8 `[T, H, W, 3]` arrays of `size`: generated
    (`make_video` of `kind`, scenes numbered as in `load_images`), or `frames` consecutive
    images of `images_dir` per video (name order, cycled), resized to `size`."""
    import numpy as np

    if images_dir:
        pictures = load_images(count * frames, seed, images_dir, start=start * frames)
        return [
            np.stack([np.asarray(p.resize(size)) for p in pictures[v * frames : (v + 1) * frames]])
            for v in range(count)
        ]
    from vllm_prumerge.testing.scenes import make_video

    return [
        make_video(seed * 100_003 + i, frames, size=size, kind=kind)
        for i in range(start, start + count)
    ]


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One request: an image or a video, a question, and (workload built with a `ChatPrompt`)
    the token ids of the checkpoint's chat template applied to that message, as `vllm serve`
    renders it."""

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
    size=(336, 336),
    prompt: Any = None,
    frames: int = 0,
    video_kind: str = "panning",
) -> list[WorkItem]:
    """`count` (image, question) requests, or with `frames` > 0 (video, question) requests
    (`load_videos` of `video_kind`), deterministic in `seed`; with `prompt` (a
    `vllm_prumerge.testing.prompts.ChatPrompt`) each with its prompt ids. `start` continues the
    same sequence: warm-up requests use media after the measured ones, never sharing a cache
    entry with them."""
    rng = random.Random(seed * 7919 + start)
    where = {"start": start, "size": size}
    if frames > 0:
        media = load_videos(count, seed, frames, images_dir, kind=video_kind, **where)
    else:
        media = load_images(count, seed, images_dir, **where)
    items = []
    for medium in media:
        question = rng.choice(QUESTIONS)
        ids = None
        if prompt is not None:
            counts = {"images": 0, "videos": 1} if frames > 0 else {}
            ids = tuple(prompt.token_ids(question, **counts))
        if frames > 0:
            items.append(WorkItem(None, question, ids, video=medium))
        else:
            items.append(WorkItem(medium, question, ids))
    return items
