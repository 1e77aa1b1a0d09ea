"""vLLM + plugin, offline, on every LLaVA family the plugin serves: LLaVA-1.5 (CLIP, CLS
attention), LLaVA-NeXT (anyres, per-crop reduction), SigLIP-LLaVA (received attention),
LLaVA-OneVision images (both) and Video-LLaVA images (its image tower).

Per family, two real engines shared with test_engine_video.py (tests/conftest.py): stock vLLM
(no plugin; for Video-LLaVA, which vLLM 0.32 cannot serve, transformers' own model stands in)
and the plugin's (prefix caching and chunked prefill on). Float32 everywhere:
greedy tokens must be identical and log-probabilities equal within LOGPROB_ATOL to the
transformers pipeline of tests/hf_reference.py, and `off` must equal stock vLLM. That pipeline
shares only the reduction core with the plugin (pinned separately against the naive reference);
tower, scores, crops, packing, projector and LLM are transformers' own. Stock counts come from
transformers' processor. Family-specific cases (fixed or per-grid stock counts, SigLIP towers
refusing `cls`, Interleave-shaped SigLIP refusing videos) take only their families.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import greedy, image_count, tokens_and_logprobs, visual_runs
from vllm_prumerge.config import PruMergeConfig

pytestmark = pytest.mark.engine

ENGINE_FAMILIES = ("llava", "llava_next", "siglip", "onevision", "video_llava")  # conftest.py
# The families whose stock engine is vLLM's own (Video-LLaVA's is transformers').
VLLM_STOCK_FAMILIES = ("llava", "llava_next", "siglip", "onevision")
# Float32 on both sides; the difference is vLLM's CPU attention/GEMM kernels vs eager torch.
LOGPROB_ATOL = 2e-3
MAX_TOKENS = 8
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
PROMPT_2 = "USER: <image>\n<image>\nHow many objects are there? ASSISTANT:"
# Fixed budget 5 per crop: every crop gives 6 tokens. LLaVA-NeXT / OneVision: base view + 2x2,
# 1x2, 2x1 and 1x2 tiles for the module's four images.
FIXED_5_COUNTS = {
    "llava": [6, 6, 6, 6],
    "siglip": [6, 6, 6, 6],
    "llava_next": [30, 18, 18, 18],
    "onevision": [30, 18, 18, 18],
    "video_llava": [6, 6, 6, 6],
}


def _sampling():
    return greedy(MAX_TOKENS)


@pytest.fixture(scope="module")
def images(scenes):
    """Sizes that give LLaVA-NeXT / OneVision the three grids of their pinpoints (2x2, 1x2, 2x1)
    and a small image (upscaled to 1x2); one view each for LLaVA-1.5 and SigLIP."""
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


@pytest.fixture(scope="module")
def stock_outputs(stock_llm, images):
    """Stock vLLM on the module's prompts."""
    return stock_llm.generate(_prompts(images), _sampling())


@pytest.fixture(scope="module")
def answer(hf, images) -> list[int]:
    """The transformers pipeline's greedy tokens for images[1] in the default mode."""
    return hf.generate(PROMPT, [images[1]], [PruMergeConfig()], MAX_TOKENS)[0]


def _assert_equals_transformers(out, hf, prompt, images, configs) -> None:
    ref_tokens, ref_logprobs, ref_counts = hf.generate(prompt, images, configs, MAX_TOKENS)
    tokens, logprobs = tokens_and_logprobs(out)
    assert visual_runs(out, {hf.image_token}) == ref_counts, configs  # per image, in order
    assert tokens == ref_tokens, configs
    assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_ATOL), configs


def _generate_one(llm, image, options=None):
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    if options is not None:
        prompt["mm_processor_kwargs"] = {"prumerge": options}
    return llm.generate([prompt], _sampling())[0]


@pytest.mark.parametrize("family", VLLM_STOCK_FAMILIES, indirect=True)
def test_stock_vllm_counts_equal_the_transformers_processors(stock_outputs, hf, images):
    expected = [[hf.stock_image_tokens(im) for im in imgs] for imgs in _image_lists(images)]
    assert [visual_runs(o, {hf.image_token}) for o in stock_outputs] == expected


@pytest.mark.parametrize("family", ["llava", "siglip"], indirect=True)
def test_single_view_families_cost_a_fixed_count_per_image_whatever_its_size(
    stock_outputs, hf, family
):
    per_image = {"llava": 576, "siglip": 729}[family]
    counts = [visual_runs(o, {hf.image_token}) for o in stock_outputs]
    assert counts == [[per_image]] * 4 + [[per_image] * 2]


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
def test_reduced_outputs_equal_the_transformers_pipeline(
    plugin_llm, stock_outputs, hf, images, mode
):
    outputs = plugin_llm.generate(_prompts(images, mode), _sampling())
    config = PruMergeConfig(mode=mode)
    for out, imgs in zip(outputs, _image_lists(images), strict=True):
        prompt = PROMPT if len(imgs) == 1 else PROMPT_2
        _assert_equals_transformers(out, hf, prompt, imgs, [config] * len(imgs))
    counts = [image_count(o, hf.image_token) for o in outputs[:4]]
    assert len(set(counts)) > 1, counts  # per-image, content-dependent counts in one batch
    if mode == "prumerge":  # PruMerge+ may keep every patch of a small image, plus one token
        stock = [image_count(o, hf.image_token) for o in stock_outputs[:4]]
        assert all(c < s for c, s in zip(counts, stock, strict=True)), (counts, stock)


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
        assert visual_runs(out, {hf.image_token}) == hf_counts
        assert tokens == hf_tokens


def test_per_request_modes_in_one_batch_get_their_own_features(plugin_llm, hf, scenes):
    image = scenes[6].resize((500, 400))  # no other test sends it: nothing cached beforehand
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
        _assert_equals_transformers(out, hf, PROMPT, [image], [config])
    counts = [image_count(o, hf.image_token) for o in outputs]
    assert counts[1] == hf.num_crops(image) * 65
    assert counts[2] == hf.stock_image_tokens(image)
    assert counts[0] > counts[4]  # PruMerge+ adds spatial samples to PruMerge's outliers


def test_cached_features_are_not_reused_across_modes_over_time(plugin_llm, hf, scenes):
    image = scenes[7].resize((600, 500))  # no other test sends it
    first = _generate_one(plugin_llm, image)
    second = _generate_one(plugin_llm, image, {"mode": "off"})
    stock = hf.stock_image_tokens(image)
    assert image_count(first, hf.image_token) < stock
    assert image_count(second, hf.image_token) == stock


def test_prefix_cache_hits_give_identical_results_and_respect_the_mode(plugin_llm, hf, images):
    # Only full KV blocks (128 tokens on CPU) are cached: a long question fills a few.
    question = "Describe the picture in detail, the colour of every object. " * 25
    long_prompt = f"USER: <image>\n{question}ASSISTANT:"
    prompt = {"prompt": long_prompt, "multi_modal_data": {"image": images[0]}}
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
    _assert_equals_transformers(
        plus, hf, long_prompt, [images[0]], [PruMergeConfig(mode="prumerge+")]
    )


# Video-LLaVA included: its image processor is told the channel layout of a 1x1 image.
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
        assert [image_count(out, hf.image_token)] == ref_counts
        assert tokens_and_logprobs(out)[0] == ref_tokens


def test_each_image_costs_the_sum_over_its_crops_of_kept_plus_one(plugin_llm, hf, images, family):
    budget = 5
    outputs = plugin_llm.generate(
        _prompts(images, {"mode": "fixed", "budget": budget})[:4], _sampling()
    )
    counts = [image_count(o, hf.image_token) for o in outputs]
    assert counts == [hf.num_crops(im) * (budget + 1) for im in images]
    assert counts == FIXED_5_COUNTS[family]


def test_received_importance_equals_the_transformers_pipeline_on_every_tower(
    plugin_llm, hf, images
):
    # CLIP towers: the attention each patch receives from all queries, CLS among them, with the
    # CLS column dropped (the ablation of CLS attention); SigLIP: what `auto` picks.
    out = _generate_one(plugin_llm, images[2], {"importance": "received"})
    _assert_equals_transformers(
        out, hf, PROMPT, [images[2]], [PruMergeConfig(importance="received")]
    )


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
    plugin_llm, images, answer, value, message
):
    with pytest.raises(ValueError, match=message):
        _generate_one(plugin_llm, images[1], value)
    assert tokens_and_logprobs(_generate_one(plugin_llm, images[1]))[0] == answer


@pytest.mark.parametrize("family", ["siglip", "onevision"], indirect=True)
def test_cls_importance_is_refused_on_siglip_towers_and_the_engine_keeps_serving(
    plugin_llm, images, answer
):
    with pytest.raises(ValueError, match="CLS"):
        _generate_one(plugin_llm, images[0], {"importance": "cls"})
    assert tokens_and_logprobs(_generate_one(plugin_llm, images[1]))[0] == answer


@pytest.mark.parametrize("family", ["siglip"], indirect=True)
def test_videos_are_refused_by_a_family_without_video_and_images_keep_working(
    plugin_llm, scenes, images, answer
):
    from vllm.exceptions import VLLMValidationError

    video = np.stack([np.asarray(scene.resize((384, 384))) for scene in scenes[:4]])
    with pytest.raises(VLLMValidationError, match=r"At most 0 video\(s\)"):
        plugin_llm.generate(
            [
                {
                    "prompt": "USER: <video>\nWhat happens? ASSISTANT:",
                    "multi_modal_data": {"video": video},
                }
            ],
            _sampling(),
        )
    assert tokens_and_logprobs(_generate_one(plugin_llm, images[1]))[0] == answer
