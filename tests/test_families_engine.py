"""LLaVA-NeXT (anyres, per-crop reduction), SigLIP-LLaVA (received attention) and
LLaVA-OneVision images (both), offline.

Per family, two real engines: stock vLLM (no plugin) and the plugin's. Float32 everywhere:
greedy tokens must be identical and log-probabilities equal within LOGPROB_ATOL to an
independent transformers pipeline (tests/hf_reference.py), and `off` must equal stock vLLM.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_ENGINE_ARGS
from tests.helpers import family_checkpoint, greedy, image_count, shutdown, tokens_and_logprobs
from tests.hf_reference import HFPruMergeLlava
from vllm_prumerge import engine_kwargs
from vllm_prumerge.config import PruMergeConfig

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 2e-3
MAX_TOKENS = 6
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
PROMPT_2 = "USER: <image>\n<image>\nHow many objects are there? ASSISTANT:"
# OneVision's stock image counts reach ~3.7k tokens on the tiny grids (two per prompt).
MAX_MODEL_LEN = {"llava_next": 4096, "siglip": 4096, "onevision": 8192}


def _sampling():
    return greedy(MAX_TOKENS)


@pytest.fixture(scope="module", params=["llava_next", "siglip", "onevision"])
def family(request, tmp_path_factory):
    """(family name, checkpoint path) of a generated checkpoint of that family."""
    return request.param, family_checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def images(scenes):
    """Sizes that give LLaVA-NeXT the three grids of its pinpoints (2x2, 1x2, 2x1) and a small
    image (upscaled to 1x2)."""
    return [
        scenes[0].resize((700, 700)),
        scenes[1].resize((672, 336)),
        scenes[2].resize((300, 700)),
        scenes[3].resize((200, 150)),
    ]


def _prompts(images, mode=None):
    extra = {} if mode is None else {"mm_processor_kwargs": {"prumerge": mode}}
    single = [{"prompt": PROMPT, "multi_modal_data": {"image": im}, **extra} for im in images]
    pair = {"prompt": PROMPT_2, "multi_modal_data": {"image": images[1:3]}, **extra}
    return [*single, pair]


def _image_lists(images):
    return [[im] for im in images] + [images[1:3]]


def _engine_args(family):
    return {**TINY_ENGINE_ARGS, "max_model_len": MAX_MODEL_LEN[family[0]]}


@pytest.fixture(scope="module")
def hf(family):
    return HFPruMergeLlava(family[1])


@pytest.fixture(scope="module")
def stock_outputs(family, images):
    """Stock vLLM (no plugin selected) on the module's prompts."""
    from vllm import LLM

    llm = LLM(model=family[1], **_engine_args(family))
    try:
        yield llm.generate(_prompts(images), _sampling())
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def plugin_llm(family, stock_outputs):
    from vllm import LLM

    llm = LLM(model=family[1], **_engine_args(family), **engine_kwargs("prumerge"))
    try:
        yield llm
    finally:
        shutdown(llm)


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
def test_reduced_outputs_equal_the_transformers_pipeline(plugin_llm, hf, images, mode):
    outputs = plugin_llm.generate(_prompts(images, mode), _sampling())
    config = PruMergeConfig(mode=mode)
    for out, imgs in zip(outputs, _image_lists(images), strict=True):
        prompt = PROMPT if len(imgs) == 1 else PROMPT_2
        ref_tokens, ref_logprobs, ref_counts = hf.generate(
            prompt, imgs, [config] * len(imgs), MAX_TOKENS
        )
        tokens, logprobs = tokens_and_logprobs(out)
        assert image_count(out, hf.image_token) == sum(ref_counts)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)
    counts = [image_count(o, hf.image_token) for o in outputs[:4]]
    assert len(set(counts)) > 1, counts  # per-image, content-dependent counts in one batch


def test_mode_off_equals_stock_vllm_and_transformers(plugin_llm, stock_outputs, hf, images):
    outputs = plugin_llm.generate(_prompts(images, "off"), _sampling())
    for out, ref, imgs in zip(outputs, stock_outputs, _image_lists(images), strict=True):
        assert list(out.prompt_token_ids) == list(ref.prompt_token_ids)
        tokens, logprobs = tokens_and_logprobs(out)
        ref_tokens, ref_logprobs = tokens_and_logprobs(ref)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL)
        prompt = PROMPT if len(imgs) == 1 else PROMPT_2
        off = [PruMergeConfig(mode="off")] * len(imgs)
        hf_tokens, _, hf_counts = hf.generate(prompt, imgs, off, MAX_TOKENS)
        assert image_count(out, hf.image_token) == sum(hf_counts)
        assert tokens == hf_tokens


def test_each_image_costs_the_sum_over_its_crops_of_kept_plus_one(plugin_llm, hf, images, family):
    # fixed budget b per crop: every crop gives b + 1 tokens, so an image costs crops * (b + 1).
    budget = 5
    prompts = _prompts(images, {"mode": "fixed", "budget": budget})[:4]
    outputs = plugin_llm.generate(prompts, _sampling())
    for out, image in zip(outputs, images, strict=True):
        crops = len(hf._crops(image)[0])
        if family[0] == "siglip":
            assert crops == 1
        assert image_count(out, hf.image_token) == crops * (budget + 1)
    if family[0] != "siglip":  # base view + 2x2, 1x2, 2x1 and 1x2 tiles
        assert [image_count(o, hf.image_token) for o in outputs] == [30, 18, 18, 18]


def test_importance_cls_is_refused_without_a_cls_token_and_received_works_on_both(
    plugin_llm, hf, images, family
):
    image = images[0]
    received = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    received["mm_processor_kwargs"] = {"prumerge": {"importance": "received"}}
    out = plugin_llm.generate([received], _sampling())[0]
    config = PruMergeConfig(importance="received")
    if family[0] != "llava_next":  # SigLIP towers
        with pytest.raises(ValueError, match="CLS"):
            plugin_llm.generate(
                [dict(received, mm_processor_kwargs={"prumerge": {"importance": "cls"}})],
                _sampling(),
            )
        ref_tokens, _, ref_counts = hf.generate(PROMPT, [image], [config], MAX_TOKENS)
        assert image_count(out, hf.image_token) == ref_counts[0]
        assert tokens_and_logprobs(out)[0] == ref_tokens
    good = plugin_llm.generate([dict(received, mm_processor_kwargs={})], _sampling())[0]
    assert len(good.outputs[0].token_ids) == MAX_TOKENS


def test_onevision_videos_are_refused_cleanly_and_images_keep_working(plugin_llm, family, images):
    if family[0] != "onevision":
        pytest.skip("video inputs exist only on LLaVA-OneVision")
    import numpy as np
    from vllm.exceptions import VLLMValidationError

    video = np.zeros((4, 384, 384, 3), dtype=np.uint8)
    with pytest.raises(VLLMValidationError, match="video"):
        plugin_llm.generate(
            [
                {
                    "prompt": "USER: <video>\nWhat happens? ASSISTANT:",
                    "multi_modal_data": {"video": video},
                }
            ],
            _sampling(),
        )
    good = plugin_llm.generate(_prompts(images[:1]), _sampling())[0]
    assert len(good.outputs[0].token_ids) == MAX_TOKENS
