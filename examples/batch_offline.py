"""Offline batch job: a folder of images + questions -> JSONL answers with per-image token counts.

One vLLM engine with the PruMerge plugin answers every question; each output line records the
visual tokens the LLM actually received for that image (PruMerge's adaptive count; 576 for stock
LLaVA-1.5). Bad input never loses other results: an unreadable or missing image, a malformed
questions line or a failed request becomes a line with "error" set, and the job goes on.

Questions, by the first rule that applies:
  1. --questions FILE, or FOLDER/questions.jsonl: one JSON object per line,
       {"image": "cat.png", "question": "What is this?",      # required; image relative to
        "id": "q1",                                            # FOLDER (or absolute); id: any
        "prumerge": "prumerge+"}                               # string/number, default the
     line number; "prumerge" (optional) overrides the reduction for this request: a mode name
     or an object of options, e.g. {"mode": "fixed", "budget": 64}.
  2. Otherwise every image in FOLDER, asking each non-empty line of its sidecar <stem>.txt
     (cat.png -> cat.txt) or, without one, --question.

    python examples/make_inputs.py inputs --images 8
    python examples/batch_offline.py inputs --tiny --mode prumerge+ --output answers.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common


@dataclasses.dataclass
class Request:
    """One question about one image, and what became of it (one output line)."""

    id: str
    image: str  # as given (relative to the folder, or absolute)
    question: str
    override: Any = None  # the line's "prumerge" value, if any
    mode: str | None = None  # the effective reduction mode
    path: Path | None = None
    error: str | None = None
    result: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "question": self.question,
            "mode": self.mode,
            "answer": self.result.get("answer"),
            "image_tokens": self.result.get("image_tokens"),
            "prompt_tokens": self.result.get("prompt_tokens"),
            "output_tokens": self.result.get("output_tokens"),
            "finish_reason": self.result.get("finish_reason"),
            "error": self.error,
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", help="folder with the images (and questions.jsonl / .txt files)")
    common.add_model_arguments(parser)
    parser.add_argument(
        "--output",
        default="answers.jsonl",
        help="JSONL to write, one line per question: id, image, question, mode, answer, "
        "image_tokens (visual tokens the LLM received), prompt_tokens, output_tokens, "
        "finish_reason, error. Default: answers.jsonl.",
    )
    parser.add_argument(
        "--questions",
        default=None,
        help="questions JSONL (default: FOLDER/questions.jsonl if it exists; see rules below).",
    )
    parser.add_argument(
        "--question",
        default=common.DEFAULT_QUESTION,
        help=f"question for images without questions. Default: {common.DEFAULT_QUESTION!r}.",
    )
    common.add_reduction_arguments(parser, mode_default="prumerge")
    common.add_generation_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="questions per LLM.generate call; results are written after each. Default: 32.",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="answer only the first N questions."
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar.")
    common.add_engine_arguments(parser)
    return parser


# --- reading the questions --------------------------------------------------------------------


def read_manifest(path: Path) -> Iterator[Request]:
    """Requests of a questions JSONL; malformed lines become requests with an error."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                item = f"invalid JSON ({exc.msg})"
            if not isinstance(item, dict):
                problem = item if isinstance(item, str) else "expected a JSON object"
                where = f"{path.name} line {number}"
                yield Request(id=str(number), image="", question="", error=f"{where}: {problem}")
                continue
            request = Request(
                id=str(item.get("id", number)),
                image=str(item.get("image", "")),
                question=str(item.get("question", "")),
                override=item.get("prumerge"),
            )
            missing = [key for key in ("image", "question") if not item.get(key)]
            if missing:
                request.error = f"{path.name} line {number}: missing {' and '.join(missing)}"
            yield request


def sidecar_requests(images: list[Path], default_question: str) -> Iterator[Request]:
    """One request per line of each image's <stem>.txt, or `default_question`."""
    for image in images:
        sidecar = image.with_suffix(".txt")
        questions = []
        if sidecar.is_file():
            questions = [q.strip() for q in sidecar.read_text(encoding="utf-8").splitlines()]
            questions = [q for q in questions if q]
        for i, question in enumerate(questions or [default_question]):
            suffix = f"-{i}" if len(questions) > 1 else ""
            yield Request(id=f"{image.stem}{suffix}", image=image.name, question=question)


def collect_requests(args: argparse.Namespace) -> tuple[list[Request], str]:
    """All requests, in order, and a description of where the questions came from."""
    folder = Path(args.folder)
    images = common.find_images(folder)  # raises for a missing folder
    manifest = Path(args.questions) if args.questions else folder / "questions.jsonl"
    if args.questions and not manifest.is_file():
        raise FileNotFoundError(f"no such questions file: {manifest}")
    if manifest.is_file():
        requests, source = list(read_manifest(manifest)), str(manifest)
    else:
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(common.IMAGE_SUFFIXES)}) in {folder}")
        requests, source = list(sidecar_requests(images, args.question)), "sidecar .txt files"
    for request in requests:
        if request.error is None:
            path = Path(request.image)
            request.path = path if path.is_absolute() else folder / path
    return requests[: args.limit] if args.limit is not None else requests, source


def resolve_modes(requests: list[Request], engine_options: dict[str, Any]) -> None:
    """Validate each request's override against the engine config; set its effective mode."""
    from vllm_prumerge import PruMergeConfig
    from vllm_prumerge.serving.options import request_config

    engine = PruMergeConfig.from_dict(engine_options)
    for request in requests:
        if request.error is not None:
            continue
        try:
            request.mode = request_config(engine, request.override).mode
        except (ValueError, TypeError) as exc:
            request.error = f"bad 'prumerge' override {request.override!r}: {exc}"


# --- answering --------------------------------------------------------------------------------


def answer(llm, requests: list[Request], images: dict[Path, Any], args, sampling) -> None:
    """Generate answers for requests whose images loaded; isolate failures to single requests."""
    image_token = llm.llm_engine.model_config.hf_config.image_token_index
    prompts = []
    for request in requests:
        prompt: dict[str, Any] = {
            "prompt": args.prompt_template.format(question=request.question),
            "multi_modal_data": {"image": images[request.path]},
        }
        if request.override is not None:
            prompt["mm_processor_kwargs"] = {"prumerge": request.override}
        prompts.append(prompt)
    try:
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
    except Exception as exc:
        if len(requests) == 1:
            requests[0].error = f"generation failed: {type(exc).__name__}: {exc}"
            return
        for request in requests:  # find the culprit(s), keep the rest
            answer(llm, [request], images, args, sampling)
        return
    for request, output in zip(requests, outputs, strict=True):
        completion = output.outputs[0]
        request.result = {
            "answer": completion.text,
            "image_tokens": output.prompt_token_ids.count(image_token),
            "prompt_tokens": len(output.prompt_token_ids),
            "output_tokens": len(completion.token_ids),
            "finish_reason": completion.finish_reason,
        }


def load_images(requests: list[Request]) -> dict[Path, Any]:
    """Decode each distinct image of a chunk once; failures are recorded on the requests."""
    images: dict[Path, Any] = {}
    failed: dict[Path, str] = {}
    for request in requests:
        if request.error is not None or request.path in images:
            continue
        if request.path not in failed:
            try:
                images[request.path] = common.open_image(request.path)
                continue
            except ValueError as exc:
                failed[request.path] = str(exc)
                common.warn(f"skipping: {exc}")
        request.error = failed[request.path]
    return images


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "<image>" not in args.prompt_template or "{question}" not in args.prompt_template:
        parser.error("--prompt-template needs one <image> and a {question} field")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        options = common.reduction_options(args, args.mode)
        engine_args = common.engine_arguments(args)
        requests, source = collect_requests(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    resolve_modes(requests, options)
    print(f"{len(requests)} question(s) from {source}", file=sys.stderr)

    common.use_cpu_if_no_gpu()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_prumerge import engine_kwargs

    started = time.perf_counter()
    llm = LLM(model=common.checkpoint_of(args), **engine_args, **engine_kwargs(**options))
    print(f"engine ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = tqdm(total=len(requests), unit="q", desc="answering", disable=args.no_progress)
    with output.open("w", encoding="utf-8") as out:
        for start in range(0, len(requests), args.batch_size):
            chunk = requests[start : start + args.batch_size]
            images = load_images(chunk)
            ready = [r for r in chunk if r.error is None]
            if ready:
                answer(llm, ready, images, args, sampling)
            for request in chunk:
                out.write(json.dumps(request.record(), ensure_ascii=False) + "\n")
            out.flush()
            progress.update(len(chunk))
    progress.close()

    answered = [r for r in requests if r.error is None]
    tokens = [r.result["image_tokens"] for r in answered]
    mean = (
        f", {sum(tokens) / len(tokens):.1f} visual tokens per answer on average" if tokens else ""
    )
    print(
        f"{len(answered)} answered, {len(requests) - len(answered)} error(s){mean}; "
        f"{time.perf_counter() - started:.1f} s -> {output}",
        file=sys.stderr,
    )
    return 0 if answered or not requests else 1


if __name__ == "__main__":
    sys.exit(main())
