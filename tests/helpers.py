"""Small helpers shared by the engine and server test modules (plain functions, no fixtures)."""

from __future__ import annotations

import base64
import gc
import io

from PIL import Image


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


def data_url(image: Image.Image) -> str:
    """A PNG `data:` URL for the OpenAI API's `image_url`."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def family_checkpoint(family: str, tmp_path_factory) -> str:
    """The session's generated checkpoint of a family (made once, shared by modules)."""
    from vllm_prumerge.testing import TinyLlavaSpec, cached_tiny_llava

    cache = tmp_path_factory.getbasetemp() / "checkpoints"
    return str(cached_tiny_llava(TinyLlavaSpec(family=family), cache_dir=cache))
