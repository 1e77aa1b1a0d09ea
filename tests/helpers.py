"""Small helpers shared by the engine and server test modules (plain functions, no fixtures)."""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import os
import re
from pathlib import Path

# The clone under test: every vLLM process of the session must import `vllm_prumerge` from here.
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "vllm_prumerge"
# `vllm_prumerge.plugin.LOADED_FROM` as logged by vLLM's logger, one line per process.
_LOADED_FROM = re.compile(r"vllm-prumerge (\S+) loaded from (.+?)\s*$", re.MULTILINE)


# vLLM inspects each model class in a subprocess of its own on first use (~20 s on 2 cores; the
# suite builds nine classes: each stock class and its PruMerge class) and keeps the result in its
# model-info cache (`VLLM_CACHE_ROOT`/modelinfos, keyed by the module file's hash). On a cold
# machine this fills that cache for every class in one subprocess instead, with vLLM's own
# inspection and cache writer, before the session's first processor, engine or server.
_INSPECT_EVERY_CLASS = """
import vllm.model_executor.models.registry as registry

from tests.helpers import _model_classes

registry._run_in_subprocess = lambda fn: fn()  # this process is that subprocess
for model in _model_classes():
    model.inspect_model_cls()
"""


def _model_classes() -> list:
    """vLLM's registry entries of every architecture the suite builds, stock and PruMerge."""
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.plugins import load_general_plugins

    from vllm_prumerge.serving.options import ARCHITECTURES

    load_general_plugins()
    models = ModelRegistry.models
    return [models[a] for a in (*ARCHITECTURES, *ARCHITECTURES.values()) if a in models]


def _cached(model) -> bool:
    """Whether vLLM's model-info cache holds the current inspection of `model`."""
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    if not isinstance(model, _LazyRegisteredModel):
        return True
    path = Path(importlib.util.find_spec(model.module_name).origin)
    return model._load_modelinfo_from_cache(model._get_modelinfo_module_hash(path)) is not None


@functools.cache
def warm_model_info() -> None:
    """Fill vLLM's model-info cache for every class the suite builds, once per session, in one
    subprocess (nothing to do when it is current)."""
    import subprocess
    import sys

    if all(map(_cached, _model_classes())):
        return
    subprocess.run(
        [sys.executable, "-c", _INSPECT_EVERY_CLASS],
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def in_process_engine():
    """Build a vLLM engine inside this process: no engine-core or worker process to spawn,
    each of which re-imports vLLM and torch (most of an engine's start on a CPU: ~10 s instead
    of ~90 s on 2 cores). vLLM's default multi-process path is what the server tests and the
    example scripts run. vLLM's CPU worker binds threads and replaces `torch.set_num_threads`
    for the whole process; both are put back, so later tests see torch as before."""
    import torch

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def start_llm(model: str, **kwargs):
    """An offline `vllm.LLM` built in this process (see `in_process_engine`)."""
    from vllm import LLM

    warm_model_info()
    with in_process_engine():
        return LLM(model=model, **kwargs)


def shutdown(llm) -> None:
    """Stop an offline `vllm.LLM`'s engine core now (not at interpreter exit)."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(max_tokens: int):
    """Greedy sampling of exactly `max_tokens` tokens with their log-probabilities."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)


def tokens_and_logprobs(output) -> tuple[list[int], list[float]]:
    """Generated token ids of a `RequestOutput` and the log-probability of each."""
    completion = output.outputs[0]
    ids = list(completion.token_ids)
    return ids, [completion.logprobs[i][t].logprob for i, t in enumerate(ids)]


def image_count(output, image_token: int) -> int:
    """Visual tokens the engine scheduled: placeholders in the expanded prompt."""
    return list(output.prompt_token_ids).count(image_token)


def family_checkpoint(family: str, tmp_path_factory) -> str:
    """The session's generated checkpoint of a family (made once, shared by modules)."""
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava

    cache = tmp_path_factory.getbasetemp() / "checkpoints"
    return str(cached_tiny_llava(TinyLlavaSpec(family=family), cache_dir=cache))


def chat_text_tokens(
    tokenizer, token: int, question: str, num_items: int, modality: str = "image"
) -> int:
    """Prompt tokens of a one-message chat request (`num_items` images or videos, then
    `question`) other than the visual tokens, by the checkpoint's own chat template and
    tokenizer (transformers): each item is one `<image>` / `<video>` token (`token`) there,
    which a server expands into its visual tokens."""
    content = [{"type": modality}] * num_items + [{"type": "text", "text": question}]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(token) == num_items, prompt
    return len(ids) - num_items


@contextlib.contextmanager
def served_from_this_clone(checkpoint: str, args, tmp_path_factory):
    """`vllm serve CHECKPOINT *args` for the enclosed tests: yields (base URL, log path), after
    checking that every served process imported this clone's `vllm_prumerge`."""
    from vllm_prumerge.testing.server import serve

    warm_model_info()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with serve(checkpoint, args, log_path=log) as base_url:
        assert_served_from_this_clone(log.read_text())
        yield base_url, log


def assert_served_from_this_clone(log: str) -> None:
    """Every "vllm-prumerge VERSION loaded from DIR" line of a vLLM log names this clone's
    package folder, and there is at least one (the plugin's `register()` logs it per process
    once vLLM's logging is configured: the engine core, and API-server workers)."""
    found = [Path(folder) for _, folder in _LOADED_FROM.findall(log)]
    assert found, "no 'vllm-prumerge ... loaded from' line in the vLLM log: plugin not loaded?"
    wrong = sorted({str(f) for f in found if f.resolve() != PACKAGE_DIR})
    assert not wrong, f"vLLM processes imported vllm_prumerge from {wrong}, not {PACKAGE_DIR}"


def visual_runs(output, tokens) -> list[int]:
    """Visual tokens per image or video, in prompt order: the lengths of the maximal runs of one
    of `tokens` (image / video placeholder ids) in the engine's expanded prompt. Items are
    separated by text in every test prompt, so a swapped pair of counts shows."""
    runs: list[int] = []
    previous = None
    for token in output.prompt_token_ids:
        if token in tokens:
            if token == previous:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs


# --- Subprocesses ------------------------------------------------------------------------------


def run_python(args, *, env=None, timeout: float = 900, cwd=None, check: bool = True):
    """Run `python ARGS...` (this interpreter) and return the completed process; with `check`,
    fail the test with the tail of its stderr unless it exited 0."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr[-6000:]}"
    return done


def run_example_main(script: str, *args, env: dict[str, str] | None = None):
    """Run examples/SCRIPT's `main(argv)` in this process, under `env` (restored after), as a
    completed process (exit code, stdout, stderr): no interpreter start and no torch, vLLM or
    transformers import per run. For scripts whose work is the tower and the reduction (no
    engine); each example also runs as a script in the engine tests."""
    import io
    import subprocess
    import sys
    from unittest import mock

    out, err = io.StringIO(), io.StringIO()
    examples = str(Path(__file__).resolve().parents[1] / "examples")
    with (
        mock.patch.dict(os.environ, env or {}),
        mock.patch.object(sys, "path", [examples, *sys.path]),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        module = importlib.import_module(Path(script).stem)
        try:
            code = module.main([str(arg) for arg in args]) or 0
        except SystemExit as done:
            code = done.code
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def cpu_env(in_process: bool = False, **extra: str) -> dict[str, str]:
    """This environment for a vLLM subprocess on the CPU platform with a small KV cache;
    `in_process`: its engine inside the subprocess (see `in_process_engine`)."""
    warm_model_info()
    return {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {}),
        **extra,
    }


# --- vLLM's multimodal processor, without an engine ---------------------------------------------


def vllm_processor(
    checkpoint: str, dtype: str = "float32", plugin: bool = True, fresh: bool = False, **options
):
    """vLLM's own multimodal processor for the checkpoint, as a server builds it, and its model
    config: with the plugin (`engine_kwargs(**options)`) or stock. Built once per argument set
    for the session (building one inspects the model in a vLLM subprocess); `fresh`: a new one,
    for tests of what a processor reads from the environment when it is built."""
    build = _build_processor if fresh else _cached_processor
    return build(checkpoint, dtype, plugin, tuple(sorted(options.items())))


def _build_processor(checkpoint: str, dtype: str, plugin: bool, options: tuple):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    from vllm_prumerge import engine_kwargs

    load_general_plugins()
    warm_model_info()
    kwargs = engine_kwargs(**dict(options)) if plugin else {}
    model_config = ModelConfig(model=checkpoint, dtype=dtype, **kwargs)
    return MULTIMODAL_REGISTRY.create_processor(model_config), model_config


_cached_processor = functools.cache(_build_processor)


def apply_processor(processor, images, mode, *, text="What is this?", cache=None) -> dict:
    """One prompt, `images` then `text`, through vLLM's `processor.apply` with the plugin option
    `mode`, under vLLM's pre-processing thread setting; vLLM's processed inputs."""
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.utils.torch_utils import set_default_torch_num_threads

    info = processor.info
    prompt = "USER: " + "<image>\n" * len(images) + f"{text} ASSISTANT:"
    inputs = ProcessorInputs(
        prompt=info.get_tokenizer().encode(prompt),
        mm_data_items=info.parse_mm_data({"image": list(images)}),
        hf_processor_mm_kwargs={"prumerge": mode},
        cache=cache,
    )
    with set_default_torch_num_threads():
        return processor.apply(inputs, TimingContext())


# --- The plugin's encoder, without vLLM -------------------------------------------------------


def encoder_counts(checkpoint: str, images, config) -> list[int]:
    """Visual tokens per PIL image by the plugin's encoder and core reduction (`len(features)`
    of `PruMergeEncoder.encode`), single-view checkpoints (LLaVA-1.5, SigLIP-LLaVA)."""
    from transformers import AutoConfig, AutoProcessor

    from vllm_prumerge.encoder import PruMergeEncoder

    pixels = AutoProcessor.from_pretrained(checkpoint).image_processor(
        images=list(images), return_tensors="pt"
    )["pixel_values"]
    vision = AutoConfig.from_pretrained(checkpoint).vision_config
    encoder = PruMergeEncoder(checkpoint, vision, device="cpu")
    return [len(f) for f in encoder.encode(pixels, config).features]


# --- Videos ------------------------------------------------------------------------------------

VIDEO_PROMPT = "USER: <video>\nWhat happens in this video? ASSISTANT:"
IMAGE_AND_VIDEO_PROMPT = "USER: <image>\n<video>\nDoes the image appear in the video? ASSISTANT:"


def frames(scenes, size):
    """A `[T, H, W, 3]` uint8 video whose frames are `scenes` resized to `size` (W, H)."""
    import numpy as np

    return np.stack([np.asarray(s.convert("RGB").resize(size)) for s in scenes])
