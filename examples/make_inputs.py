"""Write a small input folder for the examples: generated scene images + questions.jsonl.

No downloads: the scenes are drawn deterministically (shapes, text, gradients of varied
complexity, so PruMerge keeps different token counts per image).

    python examples/make_inputs.py inputs --images 8
    python examples/make_inputs.py inputs --images 8 --broken   # + an unreadable image, a
                                                                # missing one and a bad line
    python examples/make_inputs.py inputs --video 8             # + video.mp4 of 8 frames
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUESTIONS = (
    "What is shown in this image?",
    "How many objects are there?",
    "Is there any text in the image?",
    "What colour is the largest shape?",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--images", type=int, default=8, help="number of scene images. Default: 8.")
    parser.add_argument(
        "--questions-per-image",
        type=int,
        default=1,
        help="questions.jsonl lines per image (cycling through a fixed list). Default: 1.",
    )
    parser.add_argument("--seed", type=int, default=0, help="scene seed. Default: 0.")
    parser.add_argument(
        "--broken",
        action="store_true",
        help="Also write broken.png (not an image), a question about a missing image and one "
        "malformed line, to see how the examples report bad input.",
    )
    parser.add_argument(
        "--video",
        type=int,
        default=0,
        metavar="FRAMES",
        help="Also write video.mp4: FRAMES frames of a camera panning across a scene (OpenCV "
        "mp4v, 2 frames/s). Default: 0 (no video).",
    )
    args = parser.parse_args(argv)
    if args.images < 0 or args.questions_per_image < 1 or args.video < 0:
        parser.error("--images and --video must be >= 0 and --questions-per-image >= 1")

    from vllm_prumerge.testing import make_scenes

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(make_scenes(args.images, seed=args.seed)):
        name = f"scene_{i:02d}.png"
        scene.save(out / name)
        for j in range(args.questions_per_image):
            question = QUESTIONS[(i + j) % len(QUESTIONS)]
            lines.append(json.dumps({"id": f"{i:02d}-{j}", "image": name, "question": question}))
    if args.broken:
        (out / "broken.png").write_bytes(b"this is not a PNG file\n")
        for name in ("broken", "missing"):
            line = {"id": name, "image": f"{name}.png", "question": QUESTIONS[0]}
            lines.append(json.dumps(line))
        lines.append('{"id": "bad-json", "image": ')
    (out / "questions.jsonl").write_text("\n".join(lines) + "\n")
    if args.video:
        from vllm_prumerge.testing import make_video
        from vllm_prumerge.testing.media import encode_mp4

        (out / "video.mp4").write_bytes(encode_mp4(make_video(args.seed, args.video)))
        print(f"video.mp4: {args.video} frames")
    print(f"{args.images} images and {len(lines)} question lines in {out}")


if __name__ == "__main__":
    main()
