"""Ray Data LLM batch inference: a folder of images through vLLM with PruMerge, at any scale.

The job is a Ray Data LLM processor (`ray.data.llm.vLLMEngineProcessorConfig` + `build_processor`)
whose vLLM engine stage gets `engine_kwargs={**vllm_prumerge.engine_kwargs(mode), ...}`; the
plugin loads itself in every engine actor through its entry point. Ray's chat-template stage
renders each question with the checkpoint's chat template, Ray's tokenize / detokenize stages
encode and decode, the engine stage's `multimodal_data` column carries the image, and the
postprocess step counts the visual tokens the LLM got (the image token in the prompt token ids
the engine stage returns). Each result row has the fields of examples/batch_offline.py.

Two steps are our own, because Ray's library cannot do them here (ray 2.60, vLLM 0.32):
- Images are decoded in our preprocess step, not by Ray's prepare_multimodal stage: that stage
  imports `vllm.entrypoints.chat_utils`, which vLLM 0.32 moved (ModuleNotFoundError).
- Undecodable images are split off before the processor (Dataset.filter) and come back as rows
  with "error" set: inside the processor one bad image fails the whole job
  (`should_continue_on_error` covers the engine stage only).

Locally (starts a private Ray instance with --num-cpus logical CPUs and a small object store):
    python examples/make_inputs.py inputs --images 4
    python examples/ray_batch.py inputs --tiny --mode prumerge+ --output ray_answers.jsonl

On a running cluster, unchanged apart from where things are (inputs on storage every node can
read, the plugin installed on every node, a model every node can load), e.g. 8 one-GPU engines:
    python examples/ray_batch.py s3://bucket/images --model llava-hf/llava-1.5-7b-hf \\
        --address auto --concurrency 8 --gpus-per-actor 1 --output s3://bucket/answers
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import common

from vllm_prumerge.testing.prompts import template_messages

# The schema of the result rows; counts are null for failed rows.
RESULT_COLUMNS = {
    "id": "string",
    "image": "string",
    "question": "string",
    "mode": "string",
    "answer": "string",
    "image_tokens": "int64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "error": "string",
}

# --- steps that run in Ray workers: plain functions of their arguments (no `common`) -----------


def decode_image(data: bytes):
    """PIL RGB image of encoded bytes; raises ValueError with the reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.convert("RGB")
    except Exception as exc:  # truncated or malformed data raises many types
        reason = type(exc).__name__
        if "BytesIO" not in str(exc):  # PIL names the buffer, not the file
            reason += f": {exc}"
        raise ValueError(reason) from None


def is_readable(row: dict[str, Any], *, want: bool) -> bool:
    """Dataset.filter predicate: does the file decode as an image (== `want`)?"""
    try:
        decode_image(row["bytes"])
    except ValueError:
        return not want
    return want


def to_requests(row: dict[str, Any], *, questions: list[str], mode: str) -> list[dict[str, Any]]:
    """One image file -> one processor input row per question (chat messages + the image)."""
    path = str(row["path"])
    image = decode_image(row["bytes"])
    return [
        {
            "id": f"{Path(path).stem}-{i}",
            "image": path,
            "question": question,
            "mode": mode,
            # The <image> slot of the chat template; the picture itself goes to the engine.
            "messages": template_messages(question),
            "multimodal_data": {"image": image},
        }
        for i, question in enumerate(questions)
    ]


def to_error_rows(row: dict[str, Any], *, questions: list[str], mode: str) -> list[dict[str, Any]]:
    """An unreadable file -> one error row per question."""
    path = str(row["path"])
    try:
        decode_image(row["bytes"])
        reason = "unexpectedly readable"
    except ValueError as exc:
        reason = str(exc)
    return [
        result_row(
            id=f"{Path(path).stem}-{i}",
            image=path,
            question=question,
            mode=mode,
            error=f"cannot read image {path}: {reason}",
        )
        for i, question in enumerate(questions)
    ]


def add_sampling(row: dict[str, Any], *, max_tokens: int, temperature: float) -> dict[str, Any]:
    """Processor preprocess: the request's sampling parameters."""
    return {**row, "sampling_params": {"temperature": temperature, "max_tokens": max_tokens}}


def count_tokens(row: dict[str, Any], *, image_token: int) -> dict[str, Any]:
    """Processor postprocess (successful rows): answer and token counts."""
    prompt_ids = list(row["prompt_token_ids"])
    return result_row(
        id=row["id"],
        image=row["image"],
        question=row["question"],
        mode=row["mode"],
        answer=row["generated_text"],
        image_tokens=prompt_ids.count(image_token),
        prompt_tokens=len(prompt_ids),
        output_tokens=int(row["num_generated_tokens"]),
    )


def finish(row: dict[str, Any]) -> dict[str, Any]:
    """Every processor output row in the result schema; engine failures become error rows."""
    error = row.get("__inference_error__")
    if error:  # Ray skips the postprocess for these: the row still has our input columns
        return result_row(
            id=row["id"],
            image=row["image"],
            question=row["question"],
            mode=row["mode"],
            error=f"generation failed: {error}",
        )
    return {name: row.get(name) for name in RESULT_COLUMNS}


def result_row(**values: Any) -> dict[str, Any]:
    return {name: values.get(name) for name in RESULT_COLUMNS}


# --- the driver -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        help="folder of images: a local path, or any URI Ray Data reads (s3://, gs://, ...). "
        f"Files with other extensions than {', '.join(common.IMAGE_SUFFIXES)} are ignored.",
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--output",
        default="ray_answers.jsonl",
        help="where the results go: a path ending in .jsonl is written by the driver as one "
        "JSONL file (fields as in batch_offline.py, without finish_reason, which Ray's engine "
        "stage does not return); anything else is a folder or URI that the workers write "
        "Parquet files to (for large jobs). Default: ray_answers.jsonl.",
    )
    parser.add_argument(
        "--question",
        action="append",
        default=None,
        help=f"question asked about every image, repeatable. Default: {common.DEFAULT_QUESTION!r}.",
    )
    common.add_reduction_arguments(parser, mode_default="prumerge")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens to generate per answer. Default: 64."
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature. Default: 0 (greedy)."
    )

    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto', or ray://HOST:10001). Default: start a local Ray "
        "instance with --num-cpus CPUs.",
    )
    ray_group.add_argument(
        "--num-cpus",
        type=int,
        default=4,
        help="logical CPUs of the local Ray instance (ignored with --address): scheduling "
        "slots, not cores; the engine actor takes --cpus-per-actor and every light stage "
        "--cpus-per-stage, which must fit. Default: 4.",
    )
    ray_group.add_argument(
        "--object-store-mb",
        type=int,
        default=256,
        help="object store of the local Ray instance, MiB (ignored with --address). Default: 256.",
    )
    ray_group.add_argument(
        "--concurrency",
        default="1",
        help="vLLM engine actors: N, or MIN,MAX to let Ray Data autoscale. Default: 1.",
    )
    ray_group.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs reserved per engine actor. Default: 1.",
    )
    ray_group.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        help="GPUs reserved per engine actor (1 for a GPU cluster). Default: 0 (vLLM on CPU).",
    )
    ray_group.add_argument(
        "--cpus-per-stage",
        type=float,
        default=0.25,
        help="CPUs reserved per worker of the light stages (decode, chat template, tokenize, "
        "detokenize, counting). Default: 0.25, so that everything fits a 2-CPU machine.",
    )
    ray_group.add_argument(
        "--batch-size", type=int, default=16, help="rows per processor batch. Default: 16."
    )
    common.add_engine_arguments(parser)
    return parser


def concurrency_value(text: str) -> int | tuple[int, int]:
    """`concurrency` of a Ray Data LLM processor from "N" or "MIN,MAX"."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--concurrency must be N or MIN,MAX, got {text!r}") from None
    if len(sizes) == 1 and sizes[0] >= 1:
        return sizes[0]
    if len(sizes) == 2 and 1 <= sizes[0] <= sizes[1]:
        return (sizes[0], sizes[1])
    raise ValueError(f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")


def build_pipeline(args: argparse.Namespace, model: str, options: dict, engine_args: dict):
    """The result dataset (lazy): processor rows plus error rows for unreadable files."""
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoConfig

    from vllm_prumerge import engine_kwargs

    questions = args.question or [common.DEFAULT_QUESTION]
    mode = options["mode"]
    light = {"num_cpus": args.cpus_per_stage}
    bundle = {"CPU": args.cpus_per_actor}
    if args.gpus_per_actor:
        bundle["GPU"] = args.gpus_per_actor
    # vLLM settings of this shell (e.g. VLLM_CPU_KVCACHE_SPACE) apply to every stage too.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={**engine_args, **engine_kwargs(**options)},
        batch_size=args.batch_size,
        concurrency=concurrency_value(args.concurrency),
        placement_group_config={"bundles": [bundle]},
        runtime_env={"env_vars": env_vars} if env_vars else None,
        should_continue_on_error=True,
        chat_template_stage=light,
        tokenize_stage=light,
        detokenize_stage=light,
        log_engine_metrics=False,
    )
    image_token = AutoConfig.from_pretrained(model).image_token_index
    processor = build_processor(
        config,
        preprocess=functools.partial(
            add_sampling, max_tokens=args.max_tokens, temperature=args.temperature
        ),
        postprocess=functools.partial(count_tokens, image_token=image_token),
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )

    is_local = "://" not in args.input
    files = ray.data.read_binary_files(
        os.path.abspath(args.input) if is_local else args.input,
        include_paths=True,
        file_extensions=[ext.lstrip(".") for ext in common.IMAGE_SUFFIXES],
        ray_remote_args=light,
    )
    requests = files.filter(functools.partial(is_readable, want=True), **light).flat_map(
        functools.partial(to_requests, questions=questions, mode=mode), **light
    )
    failed = files.filter(functools.partial(is_readable, want=False), **light).flat_map(
        functools.partial(to_error_rows, questions=questions, mode=mode), **light
    )
    return processor(requests).map(finish, **light).union(failed)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_tokens < 1 or args.cpus_per_stage <= 0:
        parser.error("--batch-size and --max-tokens must be >= 1, --cpus-per-stage > 0")
    is_local = "://" not in args.input
    try:
        options = common.reduction_options(args, args.mode)
        engine_args = common.engine_arguments(args)
        if is_local and not common.find_images(args.input):
            raise FileNotFoundError(
                f"no images ({', '.join(common.IMAGE_SUFFIXES)}) in {args.input}"
            )
        concurrency_value(args.concurrency)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))

    common.use_cpu_if_no_gpu()
    import ray

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store_mb * 2**20,
            include_dashboard=False,
        )
    started = time.perf_counter()
    results = build_pipeline(args, common.checkpoint_of(args), options, engine_args)

    if args.output.endswith(".jsonl"):
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        answered = failed = 0
        with output.open("w", encoding="utf-8") as out:
            for row in results.iter_rows():
                record = {name: row[name] for name in RESULT_COLUMNS}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                failed += record["error"] is not None
                answered += record["error"] is None
        summary = f"{answered} answered, {failed} error(s) -> {output}"
    else:
        results.write_parquet(args.output)
        summary = f"results written to {args.output} (Parquet)"
    print(f"{summary}; {time.perf_counter() - started:.1f} s", file=sys.stderr)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
