"""Answer quality vs visual tokens on your own images or videos: pick a PruMerge mode by measuring.

One engine answers every question once per configuration (`off` first), each request choosing
its configuration with `mm_processor_kwargs`: VQA accuracy, exact match, agreement with `off`,
visual tokens per image or video, requests/s. See docs/choosing-a-mode.md, docs/benchmarks.md.

    python benchmarks/quality.py --data my.jsonl --model llava-hf/llava-1.5-7b-hf --out out/q
    python benchmarks/quality.py --images photos/ --questions questions.txt --model CKPT
    python benchmarks/quality.py --data my.jsonl --server http://127.0.0.1:8000   # vllm serve
    python benchmarks/quality.py --data my.jsonl --tiny       # generated checkpoint (smoke run)
    python benchmarks/quality.py --data clips.jsonl --frames 8 --model CKPT \\
        --configs prumerge,prumerge+,prumerge+/adaptive,prumerge/evs:0.5   # videos

Writes OUT/quality.json (every figure), quality.md, quality_vs_tokens.png, quality_answers.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import _common
import _report
from _cli import add_output_arguments, new_parser
from _common import BenchConfig

from vllm_prumerge import PruMergeConfig, engine_kwargs
from vllm_prumerge.evaluation import answers_agree, exact_match, paired_delta, vqa_accuracy, wilson
from vllm_prumerge.testing import TinyLlavaSpec, engine_args, make_scene, make_video
from vllm_prumerge.testing.images import IMAGE_SUFFIXES, find_images, is_url, open_image
from vllm_prumerge.testing.media import file_url, image_data_url, video_data_url
from vllm_prumerge.testing.prompts import chat_messages

CHAT_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
BASELINE = "off"
WARMUP_QUESTION = "What is shown in this image?"
VIDEO_FAMILIES = "LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__, "JSON, Markdown, PNG and per-answer JSONL output.")
    data = parser.add_argument_group("data (one of --data or --images)")
    data.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help="Labelled set, one JSON object per line: 'image' or 'video' (a path relative to the "
        "file's folder, an absolute path or an http(s) URL; one modality per file), 'question', "
        "'answers' (references, usually 10; lines without count for agreement only), 'id'.",
    )
    data.add_argument(
        "--images",
        metavar="DIR",
        help=f"Unlabelled set: the images in DIR ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}), "
        "each asked every question of --questions. Agreement with 'off' only.",
    )
    data.add_argument("--questions", metavar="FILE", help="One question a line (# skipped).")
    engine_args.add_number_options(
        data,
        ("--limit", int, None, "Use only the first N items of the data."),
        ("--frames", int, 8, "Videos: frames per video, sampled uniformly over the clip (first "
         "and last included; all of a shorter clip) by vLLM's own video loader, offline and on a "
         "server."),
    )  # fmt: skip
    data.add_argument(
        "--normalize-references", action="store_true", help="Normalise the references fully too."
    )
    model = parser.add_argument_group("model / server (one of --model, --tiny, --server)")
    model.add_argument(
        "--tiny",
        action="store_true",
        help="Offline on a generated tiny checkpoint (LLaVA-1.5-shaped; Video-LLaVA for videos; "
        "cached in ~/.cache/vllm-prumerge or $VLLM_PRUMERGE_CACHE): real counts, random answers.",
    )
    model.add_argument(
        "--server",
        metavar="URL",
        help="A running `vllm serve CKPT --plugin prumerge --trust-request-mm-kwargs` (add "
        "--no-enable-prefix-caching --mm-processor-cache-gb 0 for comparable requests/s).",
    )
    engine_args.add_number_options(
        model,
        ("--model", str, None, "Offline: a checkpoint of LLaVA-1.5, LLaVA-NeXT, LLaVA-Interleave, "
         f"LLaVA-OneVision (videos: {VIDEO_FAMILIES}). With --server: the served model (default: "
         "its first)."),
        ("--api-key", str, None, "With --server: its key (default: $OPENAI_API_KEY)."),
        ("--concurrency", int, 8, "With --server: most in flight."),
    )  # fmt: skip
    configs = parser.add_argument_group("configurations ('off' always runs first: the baseline)")
    engine_args.add_number_options(
        configs,
        ("--configs", str, "off,prumerge,prumerge+", "Comma-separated: off, prumerge, prumerge+, "
         "fixed:N|Ns|RATIO (+ spatial samples: s); videos also CONFIG/evs[:RATE], "
         "CONFIG/adaptive[:THRESHOLD]. '' for none besides off."),
        ("--budgets", str, "144,64,32", "Each run as fixed:N ('': none)."),
    )  # fmt: skip
    configs.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="Any option set (repeatable): a name and PruMergeConfig fields, e.g. "
        'k8=\'{"mode": "prumerge+", "k_neighbors": 8}\'.',
    )
    gen = parser.add_argument_group("generation")
    engine_args.add_number_options(
        gen,
        ("--prompt-template", str, None, "Offline only: a raw prompt with one <image> (videos: "
         "<video>) and a {question} field, sent instead of the chat prompt `vllm serve` builds."),
        ("--chat-template", str, CHAT_TEMPLATE, "The user message's text after the image or "
         "video, with a {question} field; the checkpoint's chat template renders the message "
         "(offline as `vllm serve` does)."),
        ("--max-tokens", int, 16, "Most tokens generated per answer (greedy)."),
        ("--batch-size", int, 64, "Items per batch; each batch runs every configuration."),
        ("--warmup", int, 2, "Unmeasured warm-up requests (generated media) per configuration."),
    )  # fmt: skip
    eng = engine_args.add_engine_arguments(parser, max_num_seqs=None, title="offline engine")
    eng.add_argument(
        "--keep-caches", action="store_true", help="Keep vLLM's prefix and processor caches on."
    )
    eng.add_argument("--seed", type=int, default=0, help="Engine seed (and warm-up media).")
    add_output_arguments(parser, "out/quality", "Folder for every output.", plots="PNG plot")
    return parser


def require(ok: Any, message: str) -> None:
    """An input error (the script exits with `message`) unless `ok`."""
    if not ok:
        raise ValueError(message)


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None


class Item(NamedTuple):
    """One question about one image or video; `answers` is None for unlabelled items."""

    source: str  # path or http(s) URL
    question: str
    answers: tuple[str, ...] | None
    id: Any = None
    modality: str = "image"  # or "video"


def load_jsonl(path: str) -> list[Item]:
    """Items of a JSONL file; relative media paths are resolved against its folder."""
    file = Path(path).expanduser()
    require(file.is_file(), f"--data: no such file: {file}")
    items: list[Item] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        record = parse_json(line, where)
        require(isinstance(record, dict), f"{where}: expected a JSON object")
        modality = "video" if "video" in record else "image"
        source, question, answers = (record.get(k) for k in (modality, "question", "answers"))
        ok = isinstance(source, str) and source and not {"image", "video"} <= record.keys()
        require(ok, f"{where}: give 'image' or 'video': a path or an http(s) URL")
        ok = isinstance(question, str) and question.strip()
        require(ok, f"{where}: 'question' must be a non-empty string")
        if not is_url(source):
            source = str(file.parent / Path(source).expanduser())  # an absolute path stays
            require(Path(source).is_file(), f"{where}: {modality} not found: {source}")
        if answers is not None:
            listed = answers if isinstance(answers, list) else []
            answers = tuple(a.get("answer") if isinstance(a, dict) else a for a in listed)
            ok = answers and all(isinstance(a, str) for a in answers)
            require(ok, f"{where}: 'answers' must be a non-empty list of str or {{'answer': str}}")
        ident = record.get("id", record.get("question_id"))
        items.append(Item(source, question, answers, ident, modality))
    require(items, f"--data: {file} has no items")
    mixed = len({item.modality for item in items}) > 1
    require(not mixed, f"--data: {file} mixes images and videos: give them as two data sets")
    return items


def load_folder(images_dir: str, questions_file: str) -> list[Item]:
    """Every question of `questions_file` about every image of `images_dir` (unlabelled)."""
    folder, qfile = Path(images_dir).expanduser(), Path(questions_file).expanduser()
    files = find_images(folder)  # FileNotFoundError or NotADirectoryError naming it
    require(files, f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    require(qfile.is_file(), f"--questions: no such file: {qfile}")
    questions = [q.strip() for q in qfile.read_text().splitlines()]
    questions = [q for q in questions if q and not q.startswith("#")]
    require(questions, f"--questions: {qfile} has no questions")
    return [Item(str(f), q, None, f"{f.name}#{n}") for f in files for n, q in enumerate(questions)]


def load_items(args: argparse.Namespace) -> list[Item]:
    """The items of --data or --images, after checking every other option against them."""
    one = bool(args.data) != bool(args.images)
    require(one, "give exactly one of --data FILE.jsonl or --images DIR (+ --questions)")
    together = bool(args.images) == bool(args.questions)
    require(together, "--images and --questions go together (--data has its own questions)")
    items = load_folder(args.images, args.questions) if args.images else load_jsonl(args.data)
    one_model = sum([bool(args.model) and not args.server, args.tiny, bool(args.server)]) == 1
    require(one_model, "give one of --model CKPT, --tiny (offline) or --server URL (+ --model)")
    minimum = {"limit": 1, "max_tokens": 1, "batch_size": 1, "concurrency": 1, "frames": 1}
    for name, least in {**minimum, "warmup": 0}.items():
        value = getattr(args, name)
        require(value is None or value >= least, f"--{name.replace('_', '-')} must be >= {least}")
    require("{question}" in args.chat_template, "--chat-template must contain {question}")
    args.chat_template.format(question="")  # KeyError / ValueError on a bad template
    if args.prompt_template is not None:
        require(not args.server, "--prompt-template is for offline runs: the server has its own")
        tag = f"<{items[0].modality}>"
        require(args.prompt_template.count(tag) == 1, f"--prompt-template needs exactly one {tag}")
        args.prompt_template.format(question="")
    return items[: args.limit]


def build_configs(args: argparse.Namespace) -> list[BenchConfig]:
    """`off` first, then --configs, the --budgets sweep and every --config; names unique."""
    named = [c.strip() for c in args.configs.split(",") if c.strip()]
    named += [f"fixed:{b.strip()}" for b in args.budgets.split(",") if b.strip()]
    named = [n for n in named if n.lower() != BASELINE]
    configs = _common.parse_configs(",".join([BASELINE, *named]))
    for item in args.config:
        name, sep, text = (part.strip() for part in item.partition("="))
        require(sep and name, f"--config expects NAME=JSON, got {item!r}")
        options = parse_json(text, f"--config {name}")
        require(isinstance(options, dict | str), f"--config {name}: expected a JSON object")
        PruMergeConfig.from_dict({"mode": options} if isinstance(options, str) else options)
        configs.append(BenchConfig(name, options))
    names = [c.name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    require(not repeated, f"configuration names must be unique, repeated: {repeated}")
    return configs


class Answer(NamedTuple):
    """One generated answer and its token counts."""

    text: str
    visual_tokens: int
    prompt_tokens: int
    output_tokens: int


def offline_prompt(question: str, args: argparse.Namespace, chat: Any, video: bool = False):
    """The prompt `vllm serve` builds for the chat message (the media, then --chat-template's
    text) with the checkpoint's template (`chat`, a ChatPrompt); or --prompt-template's raw text."""
    if args.prompt_template:
        return {"prompt": args.prompt_template.format(question=question)}
    text = args.chat_template.format(question=question)
    return {"prompt_token_ids": chat.token_ids(text, images=int(not video), videos=int(video))}


class OfflineEngine:
    """An in-process `vllm.LLM`: the plugin's architecture, "off" unless a request says."""

    def __init__(self, args: argparse.Namespace, video: bool) -> None:
        from vllm import LLM, SamplingParams
        from vllm.multimodal.media.connector import MediaConnector

        self.args, self.video, self.modality = args, video, "video" if video else "image"
        self.device = "cuda" if engine_args.use_cpu_if_no_gpu() else "cpu"
        spec = TinyLlavaSpec(family="video_llava") if video and args.tiny else None
        self.model = engine_args.resolve_model(None if args.tiny else args.model, spec)
        try:  # a clear error before the engine starts
            self.placeholder = _common.placeholder_token_id(self.model, int(video))
        except ValueError:
            missing = f"{self.model} takes no {self.modality}s"
            raise ValueError(f"{missing}: {VIDEO_FAMILIES} do") from None
        self.chat = None if args.prompt_template else _common.chat_prompt(self.model, int(video))
        self.loader = MediaConnector({"video": {"num_frames": args.frames}})
        limit = {self.modality: 1}
        settings = {"model": self.model, "seed": args.seed, "limit_mm_per_prompt": limit}
        if not args.keep_caches:
            settings.update(enable_prefix_caching=False, mm_processor_cache_gb=0)
        settings.update(engine_args.engine_settings(args))  # --engine-arg last
        settings.update(engine_kwargs("off", hf_overrides=settings.pop("hf_overrides", None)))
        self.settings, self.llm, self.backend = settings, LLM(**settings), "offline vllm.LLM"
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def media(self, source: Any) -> Any:
        """An image (PIL), or the frames `[T, H, W, 3]` vLLM's video loader decodes from a file."""
        if not isinstance(source, str):
            return source
        if not self.video:
            return open_image(source)
        try:
            return self.loader.fetch_video(file_url(source)).media[0]
        except ValueError as exc:
            raise ValueError(f"cannot read video {source}: {exc}") from None

    def run(self, questions: Sequence[str], media: Sequence[Any], config: BenchConfig, bar: Any):
        """Answer every (question, media) pair in `config`; (answers, seconds)."""
        options = {"mm_processor_kwargs": {"prumerge": config.prumerge}}
        prompts = [offline_prompt(q, self.args, self.chat, self.video) for q in questions]
        for prompt, item in zip(prompts, media, strict=True):
            prompt.update(options, multi_modal_data={self.modality: item})
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        bar.update(len(prompts))
        ids = [(o.outputs[0].text, o.prompt_token_ids, o.outputs[0].token_ids) for o in outputs]
        return [Answer(t, p.count(self.placeholder), len(p), len(o)) for t, p, o in ids], seconds

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class ServerClient:
    """A running `vllm serve --plugin prumerge --trust-request-mm-kwargs` (OpenAI chat API),
    loaded by vLLM's own `vllm bench serve` (each batch a dataset in OUT/datasets/)."""

    def __init__(self, args: argparse.Namespace, video: bool) -> None:
        import httpx

        self.base = args.server.rstrip("/").removesuffix("/v1")
        self.device, self.backend = "client of " + self.base, f"server {self.base}"
        api_key = args.api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        os.environ["OPENAI_API_KEY"] = api_key  # vllm bench serve sends it
        self.args, self.video, self.modality = args, video, "video" if video else "image"
        headers = {"Authorization": f"Bearer {api_key}"}
        self.http = httpx.Client(base_url=self.base, timeout=600.0, headers=headers)
        try:
            self.model = args.model or self.http.get("/v1/models").json()["data"][0]["id"]
        except Exception as exc:
            raise ConnectionError(f"--server {self.base}: cannot list models: {exc}") from None
        tokens = self._tokenize(prompt=f"<{self.modality}>")  # the templates' placeholder
        hint = f"; serve one of {VIDEO_FAMILIES}" if video else ""
        require(len(tokens) == 1, f"{self.model} takes no {self.modality}s (no token{hint})")
        self.placeholder, self.text_tokens = tokens[0], {}  # question -> non-visual tokens
        self.dtype, self.batches = None, 0
        self.blank = self.media(make_video(0, 2) if video else make_scene(0))  # any media
        self.io = {"media_io_kwargs": {"video": {"num_frames": args.frames}}} if video else {}

    def _tokenize(self, **body: Any) -> list[int]:
        """The server's own /tokenize (a prompt, or chat messages with their media)."""
        body = {"model": self.model, "add_special_tokens": False, **body}
        response = self.http.post("/tokenize", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/tokenize failed ({response.status_code}): {response.text[:500]}")
        return response.json()["tokens"]

    def media(self, source: Any) -> str:
        """The URL a request sends: an image as PNG; a video file's own bytes (or http(s) URL)."""
        if self.video:
            return file_url(source) if isinstance(source, str) else video_data_url(source)
        return image_data_url(open_image(source) if isinstance(source, str) else source)

    def _messages(self, question: str, url: str) -> list[dict[str, Any]]:
        urls = {"video_urls" if self.video else "image_urls": [url]}
        return chat_messages(self.args.chat_template.format(question=question), **urls)

    def run(self, questions: Sequence[str], media: Sequence[str], config: BenchConfig, bar: Any):
        """Answer every (question, media URL) pair in `config`; (answers, seconds)."""
        for q in set(questions) - self.text_tokens.keys():  # the same chat prompt, other media
            messages = self._messages(q, self.blank)
            tokens = self._tokenize(messages=messages, add_generation_prompt=True)
            self.text_tokens[q] = len(tokens) - tokens.count(self.placeholder)
        self.batches += 1
        path = Path(self.args.out) / "datasets" / f"batch-{self.batches}.jsonl"
        parts = [self._messages(q, u)[0]["content"] for q, u in zip(questions, media, strict=True)]
        dataset = _common.write_dataset(path, parts)
        body = {"mm_processor_kwargs": {"prumerge": config.prumerge}, **self.io}
        options = {"body": body, "concurrency": self.args.concurrency, "quiet": True}
        argv = [self.base, self.model, dataset, len(media), self.args.max_tokens]
        argv = _common.bench_serve_argv(*argv, **options)
        result = asyncio.run(_common.bench_serve(argv))
        if errors := [e for e in result["errors"] if e]:
            hint = _common.trust_hint(errors)
            raise RuntimeError(f"request failed in {config.name}{hint}: {errors[0][-500:]}")
        bar.update(len(media))
        lens = zip(questions, result["input_lens"], result["output_lens"], strict=True)
        answers = [
            Answer(answer, prompt - self.text_tokens[q], prompt, output)
            for answer, (q, prompt, output) in zip(result["generated_texts"], lens, strict=True)
        ]
        return answers, result["duration"]

    def close(self) -> None:
        self.http.close()


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score(
    items: Sequence[Item],
    configs: Sequence[BenchConfig],
    answers: dict[str, list[Answer]],
    seconds: dict[str, float],
    normalize_references: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results per configuration, records per item): `answers[name][i]` answers `items[i]`."""
    refs = [it.answers for it in items]
    labelled = [i for i, r in enumerate(refs) if r is not None]
    records = [
        {"index": i, "id": it.id, it.modality: it.source, "question": it.question}
        | {"answers": None if it.answers is None else list(it.answers), "predictions": {}}
        for i, it in enumerate(items)
    ]
    accuracy, results = {}, []
    for config in configs:
        got, name = answers[config.name], config.name
        agree = [answers_agree(a.text, b.text) for a, b in zip(got, answers[BASELINE], strict=True)]
        accuracy[name] = [
            r and vqa_accuracy(a.text, r, normalize_references=normalize_references)
            for a, r in zip(got, refs, strict=True)
        ]  # None for unlabelled items
        for record, a, ok, acc in zip(records, got, agree, accuracy[name], strict=True):
            record["predictions"][name] = {"answer": a.text, "visual_tokens": a.visual_tokens}
            record["predictions"][name] |= {"agrees_with_off": ok, "vqa_accuracy": acc}
        results.append(
            {
                "name": name,
                "prumerge": config.prumerge,
                "items": len(got),
                "labelled": len(labelled),
                "vqa_accuracy": mean([accuracy[name][i] for i in labelled]),
                "exact_match": mean([exact_match(got[i].text, refs[i]) for i in labelled]),
                "agreement_with_off": mean(agree),
                "agreement_ci95": wilson(sum(agree), len(agree)),
                **{
                    key: _common.summary([getattr(a, key) for a in got])
                    for key in Answer._fields[1:]
                },
                "seconds": seconds[name],
                "requests_per_s": len(got) / seconds[name],
            }
        )
    base = results[[c.name for c in configs].index(BASELINE)]
    for r in results:
        mine, off = ([accuracy[n][i] for i in labelled] for n in (r["name"], BASELINE))
        r["vqa_accuracy_delta_vs_off"] = paired_delta(mine, off)
        r["visual_tokens_ratio_to_off"] = r["visual_tokens"]["mean"] / base["visual_tokens"]["mean"]
        r["requests_per_s_ratio_to_off"] = r["requests_per_s"] / base["requests_per_s"]
    return results, records


def percent(key: str) -> Any:
    return lambda r: None if r[key] is None else 100 * r[key]


def delta_cell(r: dict[str, Any]) -> str:
    delta = r["vqa_accuracy_delta_vs_off"]
    if delta is None or r["name"] == BASELINE:
        return "-"
    low, high = 100 * delta["ci95_low"], 100 * delta["ci95_high"]
    return f"{100 * delta['mean']:+.1f} ({low:+.1f}, {high:+.1f})"


def markdown_report(data: dict[str, Any]) -> str:
    source, settings, media = data["data"], data["settings"], data["modality"]
    video = media == "video"
    short = "video" if video else "img"
    columns = [("config", "name"), (f"visual tok/{short} mean", "visual_tokens.mean")]
    columns += [("p50", "visual_tokens.p50"), ("p95", "visual_tokens.p95")]
    columns += [("x off", "visual_tokens_ratio_to_off")]
    if source["labelled"]:
        columns += [("VQA acc %", percent("vqa_accuracy"))]
        columns += [("Δ vs off (95% CI), points", delta_cell)]
        columns += [("exact match %", percent("exact_match"))]
    columns += [("agree with off %", percent("agreement_with_off")), ("req/s", "requests_per_s")]
    columns += [("x off", "requests_per_s_ratio_to_off")]
    frames = f", {settings['frames']} frames per video" if video else ""
    fully = ", references fully normalised" if settings["normalize_references"] else ""
    notes = "".join(f"Note: {note}\n" for note in data["notes"])
    return (
        f"# Answer quality vs visual tokens per {media}\n\nModel: `{data['model']}` "
        f"({data['backend']}); data: `{source['source']}`, {source['items']} items "
        f"({source['labelled']} labelled){frames}, max {settings['max_tokens']} tokens per "
        f"answer, greedy; {_report.device_line(data['environment'])}.\n\n"
        f"{_report.table(data['results'], columns)}\n"
        f"`VQA acc`: the official VQA evaluation{fully}; `exact match`: equals a reference; "
        "`agree with off`: equals `off`'s answer (normalised answers); `Δ vs off`: mean per-item "
        f"accuracy difference, 95% interval; visual tokens include the extra token"
        f"{' of every frame' if video else ''}; `x off`: ratio to `off`. See "
        f"docs/choosing-a-mode.md.\n\n{notes}\nMethod: {data['method']}\n"
    )


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """quality_vs_tokens.png: accuracy (labelled data) and agreement against visual tokens."""
    results, plt = data["results"], _report.pyplot()
    panels = [("vqa_accuracy", "VQA accuracy (%)")] * bool(data["data"]["labelled"])
    panels += [("agreement_with_off", "agreement with off's answers (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    xs = [r["visual_tokens"]["mean"] for r in results]
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for r, x in zip(results, xs, strict=True):
            y, off = 100 * r[key], r["name"] == BASELINE
            if off:  # a red star on a dashed line, its name below (apart from a point on it)
                ax.axhline(y, color="C3", linestyle="--", alpha=0.5)
                label = f"off (stock, {x:.0f} tokens)"
                ax.scatter([x], [y], s=220, marker="*", color="C3", zorder=4, label=label)
            else:
                ax.scatter([x], [y], s=40, color="C0", zorder=3)
            offset = (5, -12) if off else (5, 5)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        _report.token_axis(ax, max(xs), data["modality"])
        ax.set(ylim=(-3, 103), xlim=(0.8, max(1000, 1.3 * max(xs))), ylabel=title)  # stock: ~7k
        ax.set_title(title.split(" (")[0] + " vs visual tokens")
        ax.legend(fontsize=8, loc="best")
    name = Path(str(data["data"]["source"])).name
    title = f"{data['model']} ({data['backend']}); {data['data']['items']} items of {name}"
    return [_report.save_figure(fig, out, "quality_vs_tokens.png", title)]


METHOD = (
    "One engine, per-request mm_processor_kwargs; each batch runs in every configuration (order "
    "rotated per batch), greedy, after warm-up requests; one chat message (the media, then "
    "--chat-template's text) in the checkpoint's chat template. Visual tokens: offline "
    "(vllm.LLM, caches off unless --keep-caches) the placeholder's count in prompt_token_ids; "
    "server (vllm bench serve) usage.prompt_tokens minus the prompt's other tokens (/tokenize). "
    "requests/s = items / time generating them."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    wall, out, engine, notes = time.perf_counter(), Path(args.out), None, []
    try:
        items = load_items(args)
        if few := sum(1 for it in items if it.answers is not None and len(it.answers) < 4):
            notes.append(
                f"{few} labelled items have fewer than 4 references: they never reach 100% VQA "
                "accuracy (one reference always scores 0); read `exact match` for them."
            )
            print(f"note: {notes[-1]}", file=sys.stderr)
        configs, video = build_configs(args), items[0].modality == "video"
        env = _report.environment()  # before the engine loads the machine
        engine = ServerClient(args, video) if args.server else OfflineEngine(args, video)
        env["device"] = engine.device
        answers: dict[str, list[Answer]] = {c.name: [] for c in configs}
        seconds = dict.fromkeys(answers, 0.0)
        seeds = [args.seed * 7_919 + i for i in range(args.warmup)]  # generated warm-up media
        warm = [engine.media(make_video(s, args.frames) if video else make_scene(s)) for s in seeds]
        for config in configs if warm else []:
            engine.run([WARMUP_QUESTION] * len(warm), warm, config, _report.progress(0, "", True))
        with _report.progress(len(items) * len(configs), "quality", args.no_progress) as bar:
            for start in range(0, len(items), args.batch_size):
                batch = items[start : start + args.batch_size]
                media = [engine.media(item.source) for item in batch]
                shift = (start // args.batch_size) % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    bar.set_description(config.name)
                    got, took = engine.run([item.question for item in batch], media, config, bar)
                    answers[config.name].extend(got)
                    seconds[config.name] += took
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    finally:
        if engine is not None:
            engine.close()
    if args.tiny:
        notes.append("generated random-weight checkpoint: accuracy and agreement are meaningless.")
    results, records = score(items, configs, answers, seconds, args.normalize_references)
    labelled = sum(it.answers is not None for it in items)
    data: dict[str, Any] = {
        "benchmark": "quality (answer accuracy / agreement vs visual tokens)",
        "model": f"generated:tiny ({engine.model})" if args.tiny else engine.model,
        "backend": engine.backend,
        "dtype": engine.dtype,
        "engine_settings": getattr(engine, "settings", None),
        "data": {"source": args.data or args.images, "items": len(items), "labelled": labelled},
        "modality": items[0].modality,
        "baseline": BASELINE,
        "settings": dict(vars(args)),
        "method": METHOD,
        "notes": notes,
        "environment": env,
        "results": results,
        "answers_file": "quality_answers.jsonl",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plots = None if args.no_plots else plot
    return _report.finish(out, "quality", data, wall, markdown_report, plots)


if __name__ == "__main__":
    main()
