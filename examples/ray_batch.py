"""Ray Data batch inference: a dataset of images mapped through actors that each host a vLLM engine.

Every actor of the pool loads one vLLM engine with the PruMerge plugin and answers batches of
images; Ray spreads the images over the actors (and over the machines of a cluster). Each result
row has the same fields as examples/batch_offline.py, including the visual tokens the LLM got.
An image that does not decode becomes a row with "error" set; the job goes on.

Locally (starts a private Ray instance with --num-cpus CPUs and a small object store):
    python examples/make_inputs.py inputs --images 4
    python examples/ray_batch.py inputs --tiny --mode prumerge+ --output ray_answers.jsonl

On a running cluster, unchanged apart from where things are (inputs on storage every node can
read, the plugin installed on every node), e.g. 8 one-GPU actors:
    python examples/ray_batch.py s3://bucket/images --model llava-hf/llava-1.5-7b-hf \\
        --address auto --concurrency 8 --gpus-per-actor 1 --output s3://bucket/answers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import common

# The schema of the rows the actors return; counts are null for failed rows.
RESULT_COLUMNS = {
    "id": "string",
    "image": "string",
    "question": "string",
    "mode": "string",
    "answer": "string",
    "image_tokens": "int64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "finish_reason": "string",
    "error": "string",
}


class PruMergeLLM:
    """A Ray Data callable class: one vLLM engine per actor, called on batches of image files.

    Runs inside Ray worker processes, so it uses only vLLM, vllm_prumerge, PIL and pyarrow
    (nothing from the examples folder).

    Args:
        model: checkpoint (hub id or a path every node can read); None = the tiny checkpoint,
            generated on the actor's own node.
        engine_args: `vllm.LLM` keyword arguments (without PruMerge's).
        options: PruMergeConfig fields for `vllm_prumerge.engine_kwargs`.
        questions: asked about every image.
        prompt_template: with one <image> and a {question} field.
        max_tokens, temperature: sampling.
    """

    def __init__(
        self,
        model: str | None,
        engine_args: dict[str, Any],
        options: dict[str, Any],
        questions: list[str],
        prompt_template: str,
        max_tokens: int,
        temperature: float,
    ) -> None:
        import torch

        if not torch.cuda.is_available():  # this actor got no GPU: vLLM's CPU platform
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams

        from vllm_prumerge import engine_kwargs

        if model is None:
            from vllm_prumerge.testing import cached_tiny_llava

            model = str(cached_tiny_llava())
        self.llm = LLM(model=model, **engine_args, **engine_kwargs(**options))
        self.image_token = self.llm.llm_engine.model_config.hf_config.image_token_index
        self.sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        self.mode = options["mode"]
        self.questions = questions
        self.prompt_template = prompt_template

    def __call__(self, batch: dict[str, Any]):
        """`batch`: columns "path" and "bytes" (from `read_binary_files`) -> a result table."""
        import io

        import pyarrow as pa
        from PIL import Image

        rows: list[dict[str, Any]] = []
        prompts: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            path = str(path)
            try:
                with Image.open(io.BytesIO(data)) as opened:
                    opened.load()
                    image = opened.convert("RGB")
                error = None
            except Exception as exc:  # truncated or malformed data raises many types
                reason = type(exc).__name__
                if "BytesIO" not in str(exc):  # PIL names the buffer, not the file
                    reason += f": {exc}"
                image, error = None, f"cannot read image {path}: {reason}"
            for i, question in enumerate(self.questions):
                row = {
                    "id": f"{Path(path).stem}-{i}",
                    "image": path,
                    "question": question,
                    "mode": self.mode,
                    "error": error,
                }
                rows.append(row)
                if image is not None:
                    pending.append(row)
                    prompts.append(
                        {
                            "prompt": self.prompt_template.format(question=question),
                            "multi_modal_data": {"image": image},
                        }
                    )
        self._generate(prompts, pending)
        columns = {name: [row.get(name) for row in rows] for name in RESULT_COLUMNS}
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in RESULT_COLUMNS.items()])
        return pa.Table.from_pydict(columns, schema=schema)

    def _generate(self, prompts: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        """Fill `rows` with answers; a failing batch is retried one request at a time."""
        if not prompts:
            return
        try:
            outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        except Exception as exc:
            if len(prompts) == 1:
                rows[0]["error"] = f"generation failed: {type(exc).__name__}: {exc}"
                return
            for prompt, row in zip(prompts, rows, strict=True):
                self._generate([prompt], [row])
            return
        for row, output in zip(rows, outputs, strict=True):
            completion = output.outputs[0]
            row.update(
                answer=completion.text,
                image_tokens=output.prompt_token_ids.count(self.image_token),
                prompt_tokens=len(output.prompt_token_ids),
                output_tokens=len(completion.token_ids),
                finish_reason=completion.finish_reason,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        help="folder of images: a local path, or any URI Ray Data reads (s3://, gs://, ...). "
        f"Files with other extensions than {', '.join(common.IMAGE_EXTENSIONS)} are ignored.",
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--output",
        default="ray_answers.jsonl",
        help="where the results go: a path ending in .jsonl is written by the driver as one "
        "JSONL file (fields as in batch_offline.py); anything else is a folder or URI that "
        "the workers write Parquet files to (for large jobs). Default: ray_answers.jsonl.",
    )
    parser.add_argument(
        "--question",
        action="append",
        default=None,
        help=f"question asked about every image, repeatable. Default: {common.DEFAULT_QUESTION!r}.",
    )
    common.add_reduction_arguments(parser, mode_default="prumerge")
    common.add_generation_arguments(parser)

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
        default=2,
        help="CPUs of the local Ray instance (ignored with --address). Default: 2.",
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
        help="actors (vLLM engines) in the pool: N, or MIN,MAX to let Ray Data autoscale. "
        "Default: 1.",
    )
    ray_group.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor. Default: 1."
    )
    ray_group.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        help="GPUs reserved per actor (1 for a GPU cluster). Default: 0 (vLLM on CPU).",
    )
    ray_group.add_argument(
        "--batch-size", type=int, default=16, help="images per actor call. Default: 16."
    )
    common.add_engine_arguments(parser)
    return parser


def actor_pool(concurrency: str):
    """`ActorPoolStrategy` from "N" or "MIN,MAX"."""
    import ray.data

    try:
        sizes = [int(part) for part in concurrency.split(",")]
    except ValueError:
        raise ValueError(f"--concurrency must be N or MIN,MAX, got {concurrency!r}") from None
    if len(sizes) == 1 and sizes[0] >= 1:
        return ray.data.ActorPoolStrategy(size=sizes[0])
    if len(sizes) == 2 and 1 <= sizes[0] <= sizes[1]:
        return ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])
    raise ValueError(
        f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got {concurrency!r}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    questions = args.question or [common.DEFAULT_QUESTION]
    if "<image>" not in args.prompt_template or "{question}" not in args.prompt_template:
        parser.error("--prompt-template needs one <image> and a {question} field")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    is_local = "://" not in args.input
    try:
        options = common.reduction_options(args, args.mode)
        engine_args = common.engine_arguments(args)
        if is_local and not common.find_images(args.input):
            raise FileNotFoundError(
                f"no images ({', '.join(common.IMAGE_EXTENSIONS)}) in {args.input}"
            )
        compute = actor_pool(args.concurrency)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))

    import ray
    import ray.data

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store_mb * 2**20,
            include_dashboard=False,
        )
    started = time.perf_counter()
    # vLLM settings of this shell (e.g. VLLM_CPU_KVCACHE_SPACE) apply to the actors too.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    source = os.path.abspath(args.input) if is_local else args.input
    images = ray.data.read_binary_files(
        source,
        include_paths=True,
        file_extensions=[ext.lstrip(".") for ext in common.IMAGE_EXTENSIONS],
    )
    results = images.map_batches(
        PruMergeLLM,
        fn_constructor_kwargs={
            "model": None if args.tiny else args.model,
            "engine_args": engine_args,
            "options": options,
            "questions": questions,
            "prompt_template": args.prompt_template,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        },
        compute=compute,
        batch_size=args.batch_size,
        num_cpus=args.cpus_per_actor,
        num_gpus=args.gpus_per_actor,
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )

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
