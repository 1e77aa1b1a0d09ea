"""Ask a `vllm serve ... --plugin prumerge` server about images, choosing PruMerge per request.

Uses the OpenAI Python client against vLLM's chat completions API. The reduction mode is chosen
per request with vLLM's `mm_processor_kwargs` request field (sent through `extra_body`; the
server must run with `--trust-request-mm-kwargs` to accept it); without one the server's
`--prumerge-mode` applies. For every answer it reports `usage.prompt_tokens` (which counts the
reduced visual tokens) and the visual tokens themselves, counted in the prompt token ids vLLM
returns with `return_token_ids`.

    python -m vllm_prumerge.testing.checkpoint out/tiny-llava
    VLLM_TARGET_DEVICE=cpu vllm serve out/tiny-llava --plugin prumerge --dtype float32 \\
        --enforce-eager --max-model-len 2048 --trust-request-mm-kwargs --port 8000 &
    python examples/openai_client.py inputs --mode server --mode prumerge+ --mode off
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common

from vllm_prumerge.testing.engine_args import add_number_options
from vllm_prumerge.testing.media import image_data_url
from vllm_prumerge.testing.prompts import chat_messages

SERVER_DEFAULT = "server"  # --mode value meaning "no override"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files, or folders of images")
    parser.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="the server's OpenAI API root. Default: http://127.0.0.1:8000/v1.",
    )
    parser.add_argument(
        "--api-key",
        default="EMPTY",
        help="API key, if the server was started with --api-key. Default: EMPTY.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="served model name. Default: the first model the server lists.",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=[SERVER_DEFAULT, *common.MODES],
        default=None,
        help="Reduction mode for the requests, repeatable: each image is asked once per mode. "
        f"'{SERVER_DEFAULT}' sends no override (the server's --prumerge-mode). "
        f"Default: {SERVER_DEFAULT}.",
    )
    common.add_reduction_arguments(parser, mode_default=None)
    parser.add_argument(
        "--question", default=common.DEFAULT_QUESTION, help="the question for every image."
    )
    add_number_options(
        parser,
        ("--max-tokens", int, 64, "tokens to generate per answer. Default: 64."),
        ("--temperature", float, 0.0, "sampling temperature. Default: 0."),
        ("--concurrency", int, 4, "requests in flight at once. Default: 4."),
    )
    parser.add_argument(
        "--image-token",
        default="<image>",
        help="the checkpoint's image placeholder token, whose occurrences in the prompt token "
        "ids are the visual tokens. Default: <image> (LLaVA-1.5).",
    )
    parser.add_argument(
        "--output", default=None, help="also write one JSON line per request to this file."
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request.")
    return parser


def override(args: argparse.Namespace, mode: str) -> dict[str, Any] | None:
    """The request's `mm_processor_kwargs["prumerge"]`: the mode plus only the options given.

    Validated here with PruMergeConfig (the server validates again); options not given stay
    the server's.
    """
    if mode == SERVER_DEFAULT:
        return None
    common.reduction_options(args, mode)  # raises ValueError naming a bad option
    options: dict[str, Any] = {"mode": mode}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key.strip()] = value
    if mode == "fixed":
        if args.budget is not None:
            options["budget"] = args.budget
        if args.budget_ratio is not None:
            options["budget_ratio"] = args.budget_ratio
    else:
        options.pop("spatial_samples", None)
    return options


def server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def image_token_id(args: argparse.Namespace, model: str) -> int | None:
    """The id of --image-token, from the server's /tokenize (text only, cheap)."""
    body = json.dumps(
        {"model": model, "prompt": args.image_token, "add_special_tokens": False}
    ).encode()
    request = urllib.request.Request(
        server_root(args.base_url) + "/tokenize",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            tokens = json.loads(response.read())["tokens"]
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        common.warn(f"/tokenize failed ({exc}); visual tokens will not be counted")
        return None
    if len(tokens) != 1:
        common.warn(f"{args.image_token!r} is {len(tokens)} tokens, not one; not counting")
        return None
    return tokens[0]


def ask(client, args, model: str, token_id: int | None, job: dict[str, Any]) -> dict[str, Any]:
    """One chat completion; API errors are returned in the record, not raised."""
    import openai

    record = {"image": job["image"], "mode": job["mode"], "question": args.question}
    extra_body: dict[str, Any] = {"return_token_ids": True}
    if job["prumerge"] is not None:
        extra_body["mm_processor_kwargs"] = {"prumerge": job["prumerge"]}
    try:
        response = client.chat.completions.create(
            model=model,
            messages=chat_messages(args.question, [job["url"]]),
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            extra_body=extra_body,
        )
    except openai.APIError as exc:
        return {**record, "error": f"{type(exc).__name__}: {exc}"}
    prompt_ids = (response.model_extra or {}).get("prompt_token_ids")
    image_tokens = None
    if token_id is not None and prompt_ids is not None:
        image_tokens = prompt_ids.count(token_id)
    return {
        **record,
        "answer": response.choices[0].message.content,
        "image_tokens": image_tokens,
        "prompt_tokens": response.usage.prompt_tokens,
        "completion_tokens": response.usage.completion_tokens,
        "error": None,
    }


def expand_inputs(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(common.find_images(path))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(items)}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = list(dict.fromkeys(args.mode or [SERVER_DEFAULT]))
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    try:
        overrides = {mode: override(args, mode) for mode in modes}
        files = expand_inputs(args.images)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))

    from openai import APIError, OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)
    try:
        model = args.model or client.models.list().data[0].id
    except (APIError, IndexError) as exc:
        print(f"error: cannot list models at {args.base_url}: {exc}", file=sys.stderr)
        return 1
    token_id = image_token_id(args, model)

    records: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    for path in files:
        try:
            url = image_data_url(common.open_image(path))  # re-encoded: the server reads it
        except ValueError as exc:
            common.warn(f"skipping: {exc}")
            records.append({"image": str(path), "mode": None, "error": str(exc)})
            continue
        jobs += [
            {"image": str(path), "mode": m, "prumerge": overrides[m], "url": url} for m in modes
        ]
    with ThreadPoolExecutor(args.concurrency) as pool:
        records += pool.map(lambda job: ask(client, args, model, token_id, job), jobs)

    for r in records:
        if r["error"]:
            print(f"{r['image']} [{r['mode']}]: ERROR {r['error']}")
        else:
            print(
                f"{r['image']} [{r['mode']}]: {r['image_tokens']} visual tokens, "
                f"{r['prompt_tokens']} prompt tokens | {r['answer']!r}"
            )
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w", encoding="utf-8") as out:
            for r in records:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
    if any("--trust-request-mm-kwargs" in (r["error"] or "") for r in records):
        common.warn(
            "this server rejects per-request reduction modes: start `vllm serve` with "
            "--trust-request-mm-kwargs (only for trusted clients), or use --mode server"
        )
    failed = sum(1 for r in records if r["error"])
    print(f"{len(records) - failed} answered, {failed} error(s) (model {model})", file=sys.stderr)
    return 0 if failed < len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
