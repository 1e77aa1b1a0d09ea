"""Answer quality vs visual tokens on your own data: pick a PruMerge mode by measurement.

One engine answers every question of your data set once per configuration (`off` = stock: 576
visual tokens for LLaVA-1.5, thousands for LLaVA-NeXT and OneVision; `prumerge`; `prumerge+`; a
fixed-budget sweep; any option set of your own), each request choosing its configuration with
`mm_processor_kwargs={"prumerge": ...}`. Every prompt is the checkpoint's own chat template
applied to one user message (the image, then the question). Per
configuration: VQA accuracy by the official VQA evaluation rules (labelled data), exact match,
agreement with `off`'s answers (normalised exact match; needs no labels), visual tokens per image
(mean / p50 / p95) and requests/s.

    python benchmarks/quality.py --data my.jsonl --model llava-hf/llava-1.5-7b-hf --out out/q
    python benchmarks/quality.py --images photos/ --questions questions.txt --model CKPT
    python benchmarks/quality.py --data my.jsonl --server http://127.0.0.1:8000   # vllm serve
    python benchmarks/quality.py --data my.jsonl --tiny       # generated checkpoint (smoke run)

Data: `--data FILE.jsonl`, one JSON object per line with `image` (a path, relative to the JSONL's
folder or absolute, or an http(s) URL), `question`, and `answers` (a list of reference answers,
strings or {"answer": ...} objects as in VQA annotations; optional: lines without it count for
agreement only), optionally `id`. Or `--images DIR --questions FILE` (every question of FILE, one
per line, asked about every image of DIR): agreement only.

Visual tokens per image: offline, the count of the image token in the request's
`prompt_token_ids`; with `--server`, the server's `usage.prompt_tokens` minus the prompt's
non-image tokens (the same chat prompt run once through the server's /tokenize with a blank image,
per distinct question).

Writes OUT/quality.json (every figure, settings, environment), OUT/quality.md (the table),
OUT/quality_vs_tokens.png and OUT/quality_answers.jsonl (every answer of every configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _cli import add_output_arguments, new_parser
from _common import (
    BenchConfig,
    bench_serve,
    bench_serve_argv,
    parse_configs,
    summary,
    write_dataset,
)
from _report import (
    device_line,
    environment,
    finish,
    markdown_table,
    progress,
    pyplot,
    save_figure,
    token_axis,
)

from vllm_prumerge.evaluation import exact_match, normalize_answer, vqa_accuracy
from vllm_prumerge.testing.engine_args import (
    add_engine_arguments,
    add_number_options,
    engine_settings,
    resolve_model,
    use_cpu_if_no_gpu,
)
from vllm_prumerge.testing.images import IMAGE_SUFFIXES, find_images, is_url, open_image
from vllm_prumerge.testing.media import image_data_url
from vllm_prumerge.testing.prompts import ChatPrompt, chat_messages

INSTRUCTION = "Answer the question using a single word or phrase."
CHAT_TEMPLATE = "{question}\n" + INSTRUCTION
BASELINE = "off"
WARMUP_QUESTION = "What is shown in this image?"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        __doc__,
        "Every configuration runs on one engine; JSON, Markdown, PNG and per-answer JSONL "
        "output. Accuracy on the generated --tiny checkpoint is meaningless (random weights).",
    )
    data = parser.add_argument_group("data (one of --data or --images)")
    data.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help="Labelled set: one JSON object per line with 'image' (path relative to the file's "
        "folder, absolute path, or http(s) URL), 'question', 'answers' (list of reference "
        "answers, VQAv2/TextVQA style: usually 10; lines without it count for agreement "
        "only) and optionally 'id'.",
    )
    data.add_argument(
        "--images",
        metavar="DIR",
        help="Unlabelled set: the images in DIR (" + "/".join(s[1:] for s in IMAGE_SUFFIXES) + ", "
        "name order); needs --questions. Agreement with 'off' only.",
    )
    data.add_argument(
        "--questions",
        metavar="FILE",
        help="With --images: a text file of questions, one per line (blank lines and lines "
        "starting with # skipped); every question is asked about every image.",
    )
    data.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Use only the first N items (image + question pairs) of the data.",
    )
    data.add_argument(
        "--normalize-references",
        action="store_true",
        help="Also normalise the reference answers fully (number words, articles, contractions) "
        "before VQA accuracy. The official rules only strip their punctuation, since VQAv2's "
        "annotations are already normalised; use this for hand-written labels like 'Two' or "
        "'a dog'.",
    )

    model = parser.add_argument_group("model / server (one of --model, --tiny, --server)")
    model.add_argument(
        "--model",
        help="Offline: the checkpoint of a supported family (LLaVA-1.5, LLaVA-NeXT, "
        "LLaVA-Interleave, LLaVA-OneVision; a hub id such as llava-hf/llava-1.5-7b-hf, or a "
        "local folder). With --server: the served model name (default: the server's first).",
    )
    model.add_argument(
        "--tiny",
        action="store_true",
        help="Offline on the generated tiny LLaVA-1.5-shaped checkpoint (random weights, made "
        "once and cached in ~/.cache/vllm-prumerge or $VLLM_PRUMERGE_CACHE): token counts are "
        "real, answers are gibberish and accuracy is meaningless.",
    )
    model.add_argument(
        "--server",
        metavar="URL",
        help="Measure through a running `vllm serve CKPT --plugin prumerge "
        "--trust-request-mm-kwargs` (OpenAI chat API, e.g. http://127.0.0.1:8000) instead of an "
        "in-process engine. Start it with --no-enable-prefix-caching --mm-processor-cache-gb 0 "
        "for requests/s comparable across configurations.",
    )
    model.add_argument(
        "--api-key",
        default=None,
        help="With --server: the server's --api-key (default: $OPENAI_API_KEY, else 'EMPTY').",
    )
    model.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="With --server: most requests in flight at once.",
    )

    configs = parser.add_argument_group("configurations ('off' always runs first: the baseline)")
    configs.add_argument(
        "--configs",
        default="off,prumerge,prumerge+",
        help="Comma-separated named configurations: off, prumerge, prumerge+, fixed:N (keep N "
        "patches + 1 extra token), fixed:Ns (with PruMerge+ spatial samples), fixed:RATIO "
        "(e.g. fixed:0.25). '' for none besides off.",
    )
    configs.add_argument(
        "--budgets",
        default="144,64,32",
        help="Fixed-budget sweep: comma-separated patch counts (or ratios like 0.25, or Ns for "
        "spatial samples), each run as fixed:N. '' for none.",
    )
    configs.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="Any option set (repeatable): a name and a JSON object of PruMergeConfig fields, "
        'e.g. --config \'iqr2={"mode": "prumerge", "iqr_multiplier": 2.0}\' or '
        '--config \'k8={"mode": "prumerge+", "k_neighbors": 8}\'.',
    )

    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--prompt-template",
        default=None,
        help="Offline only: a raw prompt with one <image> and a {question} field, sent as "
        "text instead of the chat prompt (vLLM tokenizes it with the tokenizer's special "
        "tokens). Unset, the offline prompt is --chat-template's user message rendered by "
        "the checkpoint's own chat template: the prompt `vllm serve` builds.",
    )
    gen.add_argument(
        "--chat-template",
        default=CHAT_TEMPLATE,
        help="The text of the user message, with a {question} field (the image comes first "
        "in the same message; the checkpoint's own chat template does the rest: offline here, "
        "as `vllm serve` does for --server; so every family gets its own format).",
    )
    add_number_options(
        gen,
        ("--max-tokens", int, 16, "Most tokens generated per answer (greedy)."),
        (
            "--batch-size",
            int,
            64,
            "Items loaded and sent per batch (every configuration runs each batch, in rotating "
            "order); bounds memory for large sets.",
        ),
        (
            "--warmup",
            int,
            2,
            "Warm-up requests per configuration (generated images, not measured) before the "
            "first batch.",
        ),
    )

    eng = add_engine_arguments(parser, max_num_seqs=None, title="offline engine")
    eng.add_argument(
        "--keep-caches",
        action="store_true",
        help="Keep vLLM's prefix cache and multimodal processor cache on (default: off, so "
        "every request pays for its image and prompt and requests/s compare fairly).",
    )
    eng.add_argument("--seed", type=int, default=0, help="Engine seed (and warm-up images).")

    add_output_arguments(
        parser,
        "out/quality",
        "Folder for quality.json, quality.md, quality_vs_tokens.png and quality_answers.jsonl "
        "(created).",
        plots="PNG plot",
    )
    return parser


# --------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Item:
    """One question about one image; `answers` is None for unlabelled items."""

    index: int
    image: str  # path or http(s) URL
    question: str
    answers: tuple[str, ...] | None
    id: Any = None


def _reference_answers(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'answers' must be a non-empty list")
    answers = []
    for answer in value:
        if isinstance(answer, dict) and isinstance(answer.get("answer"), str):
            answers.append(answer["answer"])
        elif isinstance(answer, str):
            answers.append(answer)
        else:
            raise ValueError(f"{where}: each answer must be a string or {{'answer': str}}")
    return tuple(answers)


def load_jsonl(path: str) -> list[Item]:
    """Items of a JSONL file; relative image paths are resolved against its folder."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--data: no such file: {file}")
    items: list[Item] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        image, question = record.get("image"), record.get("question")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: 'image' must be a path or an http(s) URL")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if not is_url(image):
            resolved = Path(image).expanduser()
            if not resolved.is_absolute():
                resolved = file.parent / resolved
            if not resolved.is_file():
                raise FileNotFoundError(f"{where}: image not found: {resolved}")
            image = str(resolved)
        answers = record.get("answers")
        items.append(
            Item(
                index=len(items),
                image=image,
                question=question,
                answers=None if answers is None else _reference_answers(answers, where),
                id=record.get("id", record.get("question_id")),
            )
        )
    if not items:
        raise ValueError(f"--data: {file} has no items")
    return items


def load_folder(images_dir: str, questions_file: str) -> list[Item]:
    """Every question of `questions_file` about every image of `images_dir` (unlabelled)."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"--images: not a folder: {folder}")
    files = find_images(folder)
    if not files:
        raise FileNotFoundError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    qfile = Path(questions_file).expanduser()
    if not qfile.is_file():
        raise FileNotFoundError(f"--questions: no such file: {qfile}")
    questions = [
        q.strip() for q in qfile.read_text().splitlines() if q.strip() and not q.startswith("#")
    ]
    if not questions:
        raise ValueError(f"--questions: {qfile} has no questions")
    pairs = [(f, q) for f in files for q in questions]
    return [
        Item(index=i, image=str(f), question=q, answers=None, id=f"{f.name}#{questions.index(q)}")
        for i, (f, q) in enumerate(pairs)
    ]


# --------------------------------------------------------------------------------------------
# Configurations


def build_configs(args: argparse.Namespace) -> list[BenchConfig]:
    """`off` first, then --configs, the --budgets sweep and every --config; names unique."""
    named = [c.strip() for c in args.configs.split(",") if c.strip()]
    named += [f"fixed:{b.strip()}" for b in args.budgets.split(",") if b.strip()]
    named = [n for n in named if n.lower() != BASELINE]
    configs = parse_configs(",".join([BASELINE, *named]))
    from vllm_prumerge.config import PruMergeConfig

    for item in args.config:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--config expects NAME=JSON, got {item!r}")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {name}: not JSON ({exc})") from None
        if not isinstance(options, dict | str):
            raise ValueError(f"--config {name}: expected a JSON object of PruMergeConfig fields")
        PruMergeConfig.from_dict({"mode": options} if isinstance(options, str) else options)
        configs.append(BenchConfig(name, options))
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"configuration names must be unique, repeated: {duplicates}")
    return configs


# --------------------------------------------------------------------------------------------
# Engines: run a batch of items in one configuration


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer and its token counts."""

    text: str
    visual_tokens: int
    prompt_tokens: int
    output_tokens: int


def user_text(question: str, args: argparse.Namespace) -> str:
    """The text of the user message about `question` (--chat-template)."""
    return args.chat_template.format(question=question)


def offline_prompt(question: str, args: argparse.Namespace, chat: Any) -> dict[str, Any]:
    """The offline prompt about `question` (its image and options added by the caller): the
    token ids of the chat message (the image, then `user_text`) as the checkpoint's own chat
    template renders it (`chat`, a ChatPrompt), which is what `vllm serve` sends its engine for
    the messages `--server` sends; or, with --prompt-template, that raw text."""
    if args.prompt_template:
        return {"prompt": args.prompt_template.format(question=question)}
    return {"prompt_token_ids": chat.token_ids(user_text(question, args))}


class OfflineEngine:
    """An in-process `vllm.LLM` with the plugin's architecture (`engine_kwargs("off")`)."""

    kind = "offline"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from vllm import LLM, SamplingParams

        from vllm_prumerge import engine_kwargs

        self.args = args
        self.chat = None if args.prompt_template else ChatPrompt(model)
        settings: dict[str, Any] = {
            "model": model,
            "seed": args.seed,
            "limit_mm_per_prompt": {"image": 1},
        }
        if not args.keep_caches:
            settings.update(enable_prefix_caching=False, mm_processor_cache_gb=0)
        settings.update(engine_settings(args))  # --engine-arg last
        # The plugin's architecture in "off" mode; each request picks its configuration.
        user_overrides = settings.pop("hf_overrides", None)
        extra = {"hf_overrides": user_overrides} if user_overrides else {}
        settings.update(engine_kwargs("off", **extra))
        self.settings = settings
        self.llm = LLM(**settings)
        self.image_token = self.llm.llm_engine.model_config.hf_config.image_token_index
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def run(
        self, questions: Sequence[str], images: Sequence[Any], config: BenchConfig, bar: Any
    ) -> tuple[list[Answer], float]:
        """Answer every (question, image) pair in `config`; (answers, seconds)."""
        prompts = [
            {
                **offline_prompt(question, self.args, self.chat),
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"prumerge": config.prumerge},
            }
            for question, image in zip(questions, images, strict=True)
        ]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        bar.update(len(prompts))
        answers = [
            Answer(
                text=o.outputs[0].text,
                visual_tokens=o.prompt_token_ids.count(self.image_token),
                prompt_tokens=len(o.prompt_token_ids),
                output_tokens=len(o.outputs[0].token_ids),
            )
            for o in outputs
        ]
        return answers, seconds

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class ServerClient:
    """A running `vllm serve --plugin prumerge --trust-request-mm-kwargs`, through the OpenAI
    chat API, loaded by vLLM's own `vllm bench serve` (a `custom` dataset of the batch's chat
    messages, written to OUT/datasets/; the configuration in --extra-body)."""

    kind = "server"

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.base = url.rstrip("/").removesuffix("/v1")
        self.api_key = args.api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        os.environ["OPENAI_API_KEY"] = self.api_key  # vllm bench serve sends it
        self.args = args
        self.loop = asyncio.new_event_loop()
        self.model, self.image_token = self.loop.run_until_complete(self._connect())
        self.text_tokens: dict[str, int] = {}  # chat text -> non-image prompt tokens
        self.blank = image_data_url(_blank_image())
        self.dtype = None
        self.batches = 0

    async def _connect(self) -> tuple[str, int]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"}
        self.http = httpx.AsyncClient(base_url=self.base, timeout=600.0, headers=headers)
        try:
            model = self.args.model or (await self.http.get("/v1/models")).json()["data"][0]["id"]
        except Exception as exc:
            raise ConnectionError(f"--server {self.base}: cannot list models: {exc}") from None
        # The placeholder string LLaVA's chat templates render for an image.
        response = await self.http.post(
            "/tokenize", json={"model": model, "prompt": "<image>", "add_special_tokens": False}
        )
        response.raise_for_status()
        tokens = response.json()["tokens"]
        if len(tokens) != 1:
            raise ValueError(f"the served tokenizer does not have an <image> token: {tokens}")
        return model, tokens[0]

    def _text(self, question: str) -> str:
        return user_text(question, self.args)

    def _messages(self, question: str, url: str) -> list[dict[str, Any]]:
        return chat_messages(self._text(question), [url])

    async def _text_tokens(self, question: str) -> int:
        """Non-image tokens of the chat prompt of `question`: the server's own /tokenize of
        the same messages (with a blank image; the text does not depend on the image)."""
        response = await self.http.post(
            "/tokenize",
            json={
                "model": self.model,
                "messages": self._messages(question, self.blank),
                "add_generation_prompt": True,
                "add_special_tokens": False,
                "mm_processor_kwargs": {"prumerge": "off"},
            },
        )
        if response.status_code != 200:
            raise RuntimeError(f"/tokenize failed ({response.status_code}): {response.text[:500]}")
        tokens = response.json()["tokens"]
        return len(tokens) - tokens.count(self.image_token)

    async def _batch(
        self, questions: Sequence[str], urls: Sequence[str], config: BenchConfig, bar: Any
    ) -> tuple[list[Answer], float]:
        missing = sorted({q for q in questions if self._text(q) not in self.text_tokens})
        counts = await asyncio.gather(*(self._text_tokens(q) for q in missing))
        for question, count in zip(missing, counts, strict=True):
            self.text_tokens[self._text(question)] = count
        self.batches += 1
        dataset = write_dataset(
            Path(self.args.out) / "datasets" / f"batch-{self.batches}.jsonl",
            [self._messages(q, u)[0]["content"] for q, u in zip(questions, urls, strict=True)],
        )
        argv = bench_serve_argv(
            self.base,
            self.model,
            dataset,
            len(urls),
            self.args.max_tokens,
            body={"mm_processor_kwargs": {"prumerge": config.prumerge}},
            concurrency=self.args.concurrency,
            quiet=True,
        )
        result = await bench_serve(argv)
        errors = [e for e in result["errors"] if e]
        if errors:
            hint = (
                " (start the server with --trust-request-mm-kwargs)"
                if "trust-request-mm-kwargs" in str(errors)
                else ""
            )
            raise RuntimeError(f"request failed in {config.name}{hint}: {errors[0][-500:]}")
        bar.update(len(urls))
        answers = [
            Answer(
                text=text,
                visual_tokens=prompt - self.text_tokens[self._text(question)],
                prompt_tokens=prompt,
                output_tokens=output,
            )
            for question, text, prompt, output in zip(
                questions,
                result["generated_texts"],
                result["input_lens"],
                result["output_lens"],
                strict=True,
            )
        ]
        return answers, result["duration"]

    def run(
        self, questions: Sequence[str], images: Sequence[Any], config: BenchConfig, bar: Any
    ) -> tuple[list[Answer], float]:
        """Answer every (question, image) pair in `config`; (answers, seconds)."""
        urls = [image_data_url(image) for image in images]
        return self.loop.run_until_complete(self._batch(questions, urls, config, bar))

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


def _blank_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (336, 336), (128, 128, 128))


# --------------------------------------------------------------------------------------------
# Figures


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def paired_delta(values: Sequence[float], baseline: Sequence[float]) -> dict[str, Any] | None:
    """Mean of the per-item differences to the baseline, with a 95% normal-approximation
    confidence interval (None when fewer than two items)."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    if len(diffs) < 2:
        return None
    centre = sum(diffs) / len(diffs)
    variance = sum((d - centre) ** 2 for d in diffs) / (len(diffs) - 1)
    half = 1.96 * math.sqrt(variance / len(diffs))
    return {"mean": centre, "ci95_low": centre - half, "ci95_high": centre + half}


def wilson(successes: int, total: int) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return None
    z = 1.96
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(
    items: Sequence[Item],
    configs: Sequence[BenchConfig],
    answers: dict[str, list[Answer]],
    seconds: dict[str, float],
    normalize_references: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-configuration results, per-item records) from the answers of every configuration.

    `answers[name][i]` answers `items[i]`; `seconds[name]` is the time spent generating them.
    """
    labelled = [i for i, item in enumerate(items) if item.answers is not None]
    base_norm = [normalize_answer(a.text) for a in answers[BASELINE]]
    per_config: dict[str, dict[str, list[float]]] = {}
    results = []
    for config in configs:
        got = answers[config.name]
        agree = [float(normalize_answer(a.text) == b) for a, b in zip(got, base_norm, strict=True)]
        accuracy = [
            vqa_accuracy(got[i].text, items[i].answers, normalize_references=normalize_references)
            for i in labelled
        ]
        matches = [exact_match(got[i].text, items[i].answers) for i in labelled]
        per_config[config.name] = {"agree": agree, "accuracy": accuracy}
        visual = [a.visual_tokens for a in got]
        results.append(
            {
                "name": config.name,
                "prumerge": config.prumerge,
                "items": len(got),
                "labelled": len(labelled),
                "vqa_accuracy": mean(accuracy),
                "exact_match": mean(matches),
                "agreement_with_off": mean(agree),
                "agreement_ci95": wilson(int(sum(agree)), len(agree)),
                "visual_tokens": summary(visual),
                "prompt_tokens": summary([a.prompt_tokens for a in got]),
                "output_tokens": summary([a.output_tokens for a in got]),
                "seconds": seconds[config.name],
                "requests_per_s": len(got) / seconds[config.name],
            }
        )
    base = next(r for r in results if r["name"] == BASELINE)
    for r in results:
        r["vqa_accuracy_delta_vs_off"] = paired_delta(
            per_config[r["name"]]["accuracy"], per_config[BASELINE]["accuracy"]
        )
        r["visual_tokens_ratio_to_off"] = r["visual_tokens"]["mean"] / base["visual_tokens"]["mean"]
        r["requests_per_s_ratio_to_off"] = r["requests_per_s"] / base["requests_per_s"]
    records = []
    for i, item in enumerate(items):
        records.append(
            {
                "index": item.index,
                "id": item.id,
                "image": item.image,
                "question": item.question,
                "answers": list(item.answers) if item.answers is not None else None,
                "predictions": {
                    c.name: {
                        "answer": answers[c.name][i].text,
                        "visual_tokens": answers[c.name][i].visual_tokens,
                        "agrees_with_off": bool(per_config[c.name]["agree"][i]),
                        "vqa_accuracy": (
                            vqa_accuracy(
                                answers[c.name][i].text,
                                item.answers,
                                normalize_references=normalize_references,
                            )
                            if item.answers is not None
                            else None
                        ),
                    }
                    for c in configs
                },
            }
        )
    return results, records


def percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def markdown_report(data: dict[str, Any]) -> str:
    env, results = data["environment"], data["results"]
    labelled = data["data"]["labelled"] > 0
    header = ["config", "visual tok/img mean", "p50", "p95", "x off"]
    if labelled:
        header += ["VQA acc %", "Δ vs off (95% CI), points", "exact match %"]
    header += ["agree with off %", "req/s", "x off"]
    rows = []
    for r in results:
        row = [
            r["name"],
            r["visual_tokens"]["mean"],
            r["visual_tokens"]["p50"],
            r["visual_tokens"]["p95"],
            r["visual_tokens_ratio_to_off"],
        ]
        if labelled:
            delta = r["vqa_accuracy_delta_vs_off"]
            row += [
                percent(r["vqa_accuracy"]),
                "-"
                if delta is None or r["name"] == BASELINE
                else f"{100 * delta['mean']:+.1f} ({100 * delta['ci95_low']:+.1f}, "
                f"{100 * delta['ci95_high']:+.1f})",
                percent(r["exact_match"]),
            ]
        row += [
            percent(r["agreement_with_off"]),
            r["requests_per_s"],
            r["requests_per_s_ratio_to_off"],
        ]
        rows.append(row)
    lines = [
        "# Answer quality vs visual tokens per image",
        "",
        f"Model: `{data['model']}` ({data['backend']}); data: `{data['data']['source']}`, "
        f"{data['data']['items']} items ({data['data']['labelled']} labelled), "
        f"max {data['settings']['max_tokens']} tokens per answer, greedy; {device_line(env)}.",
        "",
        markdown_table(header, rows),
        "`VQA acc`: the official VQA evaluation (answer normalisation; min(#matching "
        "annotators / 3, 1) averaged over the leave-one-annotator-out subsets)"
        + (", references fully normalised" if data["settings"]["normalize_references"] else "")
        + ". `exact match`: the normalised answer equals a normalised reference. `agree with "
        "off`: the normalised answer equals `off`'s (the stock token count) for the same item. "
        "`Δ vs off`: mean per-item accuracy difference with a 95% normal-approximation "
        "interval. Visual tokens per image include the extra token; `x off` = ratio to `off`.",
        "",
    ]
    lines += [f"Note: {note}" for note in data["notes"]]
    lines += ["", "Method: " + data["method"], ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """quality_vs_tokens.png: accuracy (labelled data) and agreement against visual tokens."""
    plt = pyplot()

    results = data["results"]
    panels = [("agreement_with_off", "agreement with off's answers (%)")]
    if data["data"]["labelled"]:
        panels.insert(0, ("vqa_accuracy", "VQA accuracy (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    xs = [r["visual_tokens"]["mean"] for r in results]
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ys = [100 * r[key] for r in results]
        for r, x, y in zip(results, xs, ys, strict=True):
            is_off = r["name"] == BASELINE
            ax.scatter(
                [x],
                [y],
                marker="*" if is_off else "o",
                s=220 if is_off else 40,
                color="C3" if is_off else "C0",
                zorder=4 if is_off else 3,
                label=f"off (stock, {x:.0f} tokens)" if is_off else None,
            )
            offset = (5, -12) if is_off else (5, 5)  # off apart from a point on top of it
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        off_y = ys[[r["name"] for r in results].index(BASELINE)]
        ax.axhline(off_y, color="C3", linestyle="--", alpha=0.5)
        token_axis(ax, max(xs), "image")
        ax.set_ylim(-3, 103)
        ax.set_xlim(0.8, max(1000, 1.3 * max(xs)))  # stock NeXT / OneVision: thousands
        ax.set_ylabel(title)
        ax.set_title(title.split(" (")[0] + " vs visual tokens")
        ax.legend(fontsize=8, loc="best")
    title = (
        f"{data['model']} ({data['backend']}); {data['data']['items']} items of "
        f"{Path(str(data['data']['source'])).name}"
    )
    return [save_figure(fig, out, "quality_vs_tokens.png", title)]


METHOD = (
    "One engine serves every configuration through per-request "
    "mm_processor_kwargs={'prumerge': ...}; each batch of items runs in every configuration "
    "(order rotated per batch), greedy decoding. Both paths send the same chat message (the "
    "image, then the question in --chat-template), rendered by the checkpoint's own chat "
    "template (offline: the token ids vllm serve would build). Offline: vllm.LLM with the plugin's "
    "architecture, prefix and multimodal processor caches off unless --keep-caches; visual "
    "tokens = count of the image token in prompt_token_ids. Server: OpenAI chat completions "
    "sent by vLLM's own load generator (vllm bench serve, a custom dataset of each batch); "
    "visual tokens = usage.prompt_tokens minus the non-image tokens of the same chat prompt "
    "(from the server's /tokenize with a blank image). requests/s = items / time spent "
    "generating them (image decoding excluded; pre-processing, CLIP tower, reduction, prefill "
    "and decode included). Warm-up requests on generated images precede the first batch."
)


# --------------------------------------------------------------------------------------------


def resolve_items(args: argparse.Namespace) -> tuple[list[Item], str]:
    if bool(args.data) == bool(args.images):
        raise ValueError("give exactly one of --data FILE.jsonl or --images DIR (+ --questions)")
    if args.images:
        if not args.questions:
            raise ValueError("--images needs --questions FILE (one question per line)")
        items, source = load_folder(args.images, args.questions), args.images
    else:
        if args.questions:
            raise ValueError("--questions goes with --images; --data has its own questions")
        items, source = load_jsonl(args.data), args.data
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError("--limit must be >= 1")
        items = items[: args.limit]
    return items, source


def validate(args: argparse.Namespace) -> None:
    choices = [bool(args.model) and not args.server, args.tiny, bool(args.server)]
    if sum(choices) != 1:
        raise ValueError(
            "give one of --model CKPT, --tiny (offline) or --server URL (with an optional "
            "--model naming the served model)"
        )
    for name in ("max_tokens", "batch_size", "concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if "{question}" not in args.chat_template:
        raise ValueError("--chat-template must contain {question}")
    args.chat_template.format(question="")  # KeyError / ValueError on a bad template
    if args.prompt_template is not None:
        if args.server:
            raise ValueError("--prompt-template is for offline runs: the server builds its prompt")
        if args.prompt_template.count("<image>") != 1:
            raise ValueError("--prompt-template must contain exactly one <image>")
        args.prompt_template.format(question="")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
        items, source = resolve_items(args)
        configs = build_configs(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        parser.error(str(exc))
    wall = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    few = sum(1 for item in items if item.answers is not None and len(item.answers) < 4)
    if few:
        notes.append(
            f"{few} labelled items have fewer than 4 reference answers: by the official rule "
            "their VQA accuracy can never reach 100% (a single answer always scores 0); read "
            "`exact match` for single-answer labels."
        )
        print(f"note: {notes[-1]}", file=sys.stderr)

    if args.server:
        engine: Any = ServerClient(args.server, args)
        model = engine.model
        env = environment({"device": "client of " + engine.base})
    else:
        has_gpu = use_cpu_if_no_gpu()
        model = resolve_model(None if args.tiny else args.model)
        env = environment({"device": "cuda" if has_gpu else "cpu"})
        engine = OfflineEngine(model, args)

    answers: dict[str, list[Answer]] = {c.name: [] for c in configs}
    seconds = dict.fromkeys(answers, 0.0)
    try:
        if args.warmup:
            from vllm_prumerge.testing import make_scene

            warm = [make_scene(args.seed * 7_919 + i) for i in range(args.warmup)]
            silent = progress(0, "", disable=True)
            for config in configs:
                engine.run([WARMUP_QUESTION] * len(warm), warm, config, silent)
        total = len(items) * len(configs)
        with progress(total, "quality", disable=args.no_progress) as bar:
            for start in range(0, len(items), args.batch_size):
                batch = items[start : start + args.batch_size]
                images = [open_image(item.image) for item in batch]
                questions = [item.question for item in batch]
                shift = (start // args.batch_size) % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    bar.set_description(config.name)
                    got, took = engine.run(questions, images, config, bar)
                    answers[config.name].extend(got)
                    seconds[config.name] += took
    finally:
        engine.close()

    results, records = score(items, configs, answers, seconds, args.normalize_references)
    if args.tiny:
        notes.append(
            "generated checkpoint with random weights: accuracy and agreement are meaningless."
        )
    data: dict[str, Any] = {
        "benchmark": "quality (answer accuracy / agreement vs visual tokens)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": model if not args.tiny else f"generated:tiny ({model})",
        "backend": f"server {engine.base}" if args.server else "offline vllm.LLM",
        "dtype": engine.dtype,
        "engine_settings": getattr(engine, "settings", None),
        "data": {
            "source": source,
            "items": len(items),
            "labelled": sum(item.answers is not None for item in items),
        },
        "baseline": BASELINE,
        "settings": dict(vars(args)),
        "method": METHOD,
        "notes": notes,
        "environment": env,
        "results": results,
        "answers_file": "quality_answers.jsonl",
    }
    with open(out / "quality_answers.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return finish(out, "quality", data, wall, markdown_report, None if args.no_plots else plot)


if __name__ == "__main__":
    main()
