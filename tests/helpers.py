"""Small helpers shared by the engine and server test modules (plain functions, no fixtures)."""

from __future__ import annotations

import contextlib
import gc
import os
import re
from pathlib import Path

# The clone under test: every vLLM process of the session must import `vllm_prumerge` from here.
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "vllm_prumerge"
# `vllm_prumerge.plugin.LOADED_FROM` as logged by vLLM's logger, one line per process.
_LOADED_FROM = re.compile(r"vllm-prumerge (\S+) loaded from (.+?)\s*$", re.MULTILINE)


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


def assert_served_from_this_clone(log: str) -> None:
    """Every "vllm-prumerge VERSION loaded from DIR" line of a vLLM log names this clone's
    package folder, and there is at least one (the plugin's `register()` logs it per process
    once vLLM's logging is configured: the engine core, and API-server workers)."""
    found = [Path(folder) for _, folder in _LOADED_FROM.findall(log)]
    assert found, "no 'vllm-prumerge ... loaded from' line in the vLLM log: plugin not loaded?"
    wrong = sorted({str(f) for f in found if f.resolve() != PACKAGE_DIR})
    assert not wrong, f"vLLM processes imported vllm_prumerge from {wrong}, not {PACKAGE_DIR}"
