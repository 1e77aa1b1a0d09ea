"""vLLM + plugin, offline, against stock vLLM and an independent transformers pipeline.

Two real engines per module: stock vLLM LLaVA (no plugin) and the plugin's engine with prefix
caching and chunked prefill at a small token budget. Float32 everywhere: greedy tokens must be
identical and log-probabilities equal within LOGPROB_ATOL.
"""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import TINY_ENGINE_ARGS
from tests.helpers import greedy, image_count, shutdown, tokens_and_logprobs
from tests.hf_reference import HFPruMergeLlava
from vllm_prumerge import engine_kwargs
from vllm_prumerge.config import PruMergeConfig

pytestmark = pytest.mark.engine

# Float32 on both sides; the difference is vLLM's CPU attention/GEMM kernels vs eager torch.
LOGPROB_ATOL = 2e-3
MAX_TOKENS = 8
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
PROMPT_2 = "USER: <image>\n<image>\nHow many objects are there? ASSISTANT:"


def _sampling():
    return greedy(MAX_TOKENS)


@pytest.fixture(scope="module")
def hf(tiny_llava):
    return HFPruMergeLlava(tiny_llava)


def _prompts(scenes):
    return [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in scenes[:4]] + [
        {"prompt": PROMPT_2, "multi_modal_data": {"image": [scenes[4], scenes[5]]}}
    ]


@pytest.fixture(scope="module")
def stock_outputs(tiny_llava, scenes):
    """Stock vLLM LLaVA (no plugin selected) on the module's prompts."""
    from vllm import LLM

    llm = LLM(model=tiny_llava, **TINY_ENGINE_ARGS)
    try:
        yield llm.generate(_prompts(scenes), _sampling())
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def plugin_llm(tiny_llava, stock_outputs):
    """The plugin's engine (default mode prumerge), prefix caching on, chunked prefill at 256."""
    from vllm import LLM

    args = {
        **TINY_ENGINE_ARGS,
        "enable_prefix_caching": True,
        "enable_chunked_prefill": True,
        "max_num_batched_tokens": 256,
    }
    llm = LLM(model=tiny_llava, **args, **engine_kwargs("prumerge"))
    try:
        yield llm
    finally:
        shutdown(llm)


def test_stock_vllm_gives_576_image_tokens_per_image(stock_outputs, hf):
    counts = [image_count(o, hf.image_token) for o in stock_outputs]
    assert counts == [576, 576, 576, 576, 1152]
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in stock_outputs)


def test_prumerge_outputs_equal_the_transformers_pipeline(plugin_llm, hf, scenes):
    outputs = plugin_llm.generate(_prompts(scenes), _sampling())
    config = PruMergeConfig()
    images = [[img] for img in scenes[:4]] + [[scenes[4], scenes[5]]]
    for out, imgs in zip(outputs, images, strict=True):
        prompt = PROMPT if len(imgs) == 1 else PROMPT_2
        ref_tokens, ref_logprobs, ref_counts = hf.generate(
            prompt, imgs, [config] * len(imgs), MAX_TOKENS
        )
        tokens, logprobs = tokens_and_logprobs(out)
        assert image_count(out, hf.image_token) == sum(ref_counts)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)
    counts = [image_count(o, hf.image_token) for o in outputs[:4]]
    assert all(c < 576 for c in counts) and len(set(counts)) > 1, counts


def test_mode_off_equals_stock_vllm(plugin_llm, stock_outputs, scenes):
    prompts = [dict(p, mm_processor_kwargs={"prumerge": "off"}) for p in _prompts(scenes)]
    outputs = plugin_llm.generate(prompts, _sampling())
    for out, ref in zip(outputs, stock_outputs, strict=True):
        assert list(out.prompt_token_ids) == list(ref.prompt_token_ids)
        tokens, logprobs = tokens_and_logprobs(out)
        ref_tokens, ref_logprobs = tokens_and_logprobs(ref)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)


def test_per_request_modes_in_one_batch_get_their_own_features(plugin_llm, hf, scenes):
    image = scenes[6]
    configs = [
        PruMergeConfig(mode="prumerge+"),
        PruMergeConfig(mode="fixed", budget=64),
        PruMergeConfig(mode="off"),
        PruMergeConfig(mode="prumerge", order="raster", merge_weighting="normalized"),
        PruMergeConfig(),
    ]
    # The same image under five option sets in one batch: the processor cache must not hand
    # one request the features computed for another.
    prompts = [
        {
            "prompt": PROMPT,
            "multi_modal_data": {"image": image},
            "mm_processor_kwargs": {"prumerge": c.to_dict()},
        }
        for c in configs
    ]
    outputs = plugin_llm.generate(prompts, _sampling())
    for out, config in zip(outputs, configs, strict=True):
        ref_tokens, ref_logprobs, ref_counts = hf.generate(PROMPT, [image], [config], MAX_TOKENS)
        tokens, logprobs = tokens_and_logprobs(out)
        assert image_count(out, hf.image_token) == ref_counts[0], config
        assert tokens == ref_tokens, config
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)
    counts = [image_count(o, hf.image_token) for o in outputs]
    assert counts[1] == 65 and counts[2] == 576
    assert counts[0] > counts[4]  # PruMerge+ adds spatial samples to PruMerge's outliers


def test_cached_features_are_not_reused_across_modes_over_time(plugin_llm, hf, scenes):
    image = scenes[7]
    first = plugin_llm.generate(
        [{"prompt": PROMPT, "multi_modal_data": {"image": image}}], _sampling()
    )[0]
    second = plugin_llm.generate(
        [
            {
                "prompt": PROMPT,
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"prumerge": {"mode": "off"}},
            }
        ],
        _sampling(),
    )[0]
    assert image_count(first, hf.image_token) < 576
    assert image_count(second, hf.image_token) == 576


def test_prefix_cache_hits_give_identical_results_and_respect_the_mode(plugin_llm, hf, scenes):
    # Only full KV blocks (128 tokens on CPU) are cached: a long question fills a few.
    question = "Describe the picture in detail, the colour of every object. " * 25
    long_prompt = f"USER: <image>\n{question}ASSISTANT:"
    prompt = {"prompt": long_prompt, "multi_modal_data": {"image": scenes[0]}}
    first = plugin_llm.generate([prompt], _sampling())[0]
    second = plugin_llm.generate([prompt], _sampling())[0]
    assert second.num_cached_tokens >= 128
    assert tokens_and_logprobs(first)[0] == tokens_and_logprobs(second)[0]
    assert tokens_and_logprobs(second)[1] == pytest.approx(
        tokens_and_logprobs(first)[1], abs=LOGPROB_ATOL
    )
    # Same image and text, another mode: the blocks holding the image must not be reused.
    plus = plugin_llm.generate(
        [dict(prompt, mm_processor_kwargs={"prumerge": "prumerge+"})], _sampling()
    )[0]
    config = PruMergeConfig(mode="prumerge+")
    ref_tokens, ref_logprobs, ref_counts = hf.generate(
        long_prompt, [scenes[0]], [config], MAX_TOKENS
    )
    assert image_count(plus, hf.image_token) == ref_counts[0]
    assert tokens_and_logprobs(plus)[0] == ref_tokens
    assert tokens_and_logprobs(plus)[1] == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)


def test_odd_images_get_correct_results(plugin_llm, hf):
    images = [
        Image.new("RGB", (1, 1), (200, 30, 30)),
        Image.new("RGB", (8, 900), (10, 120, 240)),  # extreme aspect ratio
        Image.new("RGB", (336, 336), (128, 128, 128)),  # flat: nearly uniform attention
    ]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images]
    outputs = plugin_llm.generate(prompts, _sampling())
    for out, img in zip(outputs, images, strict=True):
        ref_tokens, _, ref_counts = hf.generate(PROMPT, [img], [PruMergeConfig()], MAX_TOKENS)
        assert image_count(out, hf.image_token) == ref_counts[0] >= 2
        assert tokens_and_logprobs(out)[0] == ref_tokens


@pytest.mark.parametrize(
    "value, message",
    [
        ("nonsense", "mode"),
        ({"mode": "fixed"}, "budget"),
        ({"k_neighbors": -1}, "k_neighbors"),
        ({"bogus_option": 1}, "bogus_option"),
        (7, "prumerge"),
    ],
)
def test_bad_request_options_are_rejected_and_the_engine_keeps_serving(
    plugin_llm, scenes, value, message
):
    bad = {
        "prompt": PROMPT,
        "multi_modal_data": {"image": scenes[1]},
        "mm_processor_kwargs": {"prumerge": value},
    }
    with pytest.raises(ValueError, match=message):
        plugin_llm.generate([bad], _sampling())
    good = plugin_llm.generate(
        [{"prompt": PROMPT, "multi_modal_data": {"image": scenes[1]}}], _sampling()
    )[0]
    assert len(good.outputs[0].token_ids) == MAX_TOKENS
