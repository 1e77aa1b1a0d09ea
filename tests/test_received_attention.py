"""Received attention (the importance of CLS-free towers) and the SigLIP feature path.

Independent paths: a naive transcription of the definition with Python loops over heads and
queries, and transformers' own eager attention probabilities (``output_attentions``) of small
randomly initialised SigLIP 384/14 (729 patches, no CLS) and CLIP 336/14 towers.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import received_attention, reduce_by_importance
from vllm_prumerge.testing.naive_reference import (
    naive_class_attention,
    naive_descending,
    naive_merge,
    naive_outlier_ratio,
    naive_plus_samples,
)
from vllm_prumerge.vision import tower_scores

TOL = {"atol": 1e-6, "rtol": 1e-5}


def naive_received_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``s_j = mean_h mean_i softmax_j(q_i^h . k_j^h / sqrt(d_h))`` for one image, with loops.

    q, k: ``[T, D]``; returns ``[T]`` float64.
    """
    tokens, width = q.shape
    d = width // heads
    total = torch.zeros(tokens, dtype=torch.float64)
    for h in range(heads):
        qh, kh = q[:, h * d : (h + 1) * d].double(), k[:, h * d : (h + 1) * d].double()
        for i in range(tokens):
            logits = [float(qh[i] @ kh[j]) / math.sqrt(d) for j in range(tokens)]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            norm = sum(weights)
            total += torch.tensor([w / norm for w in weights], dtype=torch.float64)
    return total / (heads * tokens)


@pytest.mark.parametrize("tokens, width, heads", [(7, 8, 2), (13, 12, 3), (5, 16, 1)])
def test_received_attention_equals_a_loop_transcription_of_its_definition(tokens, width, heads):
    torch.manual_seed(tokens)
    q, k = torch.randn(2, tokens, width) * 2, torch.randn(2, tokens, width) * 2
    for chunk in (1, 3, 1024):  # the chunking is a memory bound only
        out = received_attention(q, k, heads, chunk=chunk)
        for b in range(2):
            expected = naive_received_attention(q[b], k[b], heads).float()
            torch.testing.assert_close(out[b], expected, **TOL)
    assert torch.allclose(out.sum(-1), torch.ones(2))  # every query's row sums to 1


def test_received_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heads"):
        received_attention(torch.zeros(1, 4, 6), torch.zeros(1, 4, 6), 4)
    with pytest.raises(ValueError, match="shape"):
        received_attention(torch.zeros(1, 4, 8), torch.zeros(1, 5, 8), 2)


@pytest.fixture(scope="module")
def siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=384,
        patch_size=14,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        vision_use_head=False,
    )
    return SiglipVisionModel._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return CLIPVisionModel._from_config(config, attn_implementation="eager").eval()


def _pixels(size: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size)


def _hooked_projections(tower, layer_index, pixels):
    """transformers' forward, and the raw q/k projections of layer `layer_index` (`[B, T, D]`)."""
    attention = getattr(tower, "vision_model", tower).encoder.layers[layer_index].self_attn
    captured = {}
    hooks = [
        attention.q_proj.register_forward_hook(lambda m, i, o: captured.update(q=o)),
        attention.k_proj.register_forward_hook(lambda m, i, o: captured.update(k=o)),
    ]
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return out, captured["q"], captured["k"]


def _hooked_keys(tower, layer_index, pixels):
    out, _, keys = _hooked_projections(tower, layer_index, pixels)
    return out, keys


@pytest.mark.parametrize("feature_layer, scoring_layer", [(-1, 2), (-2, 2), (1, 1)])
def test_siglip_scores_equal_transformers_attention_probabilities(
    siglip, feature_layer, scoring_layer
):
    pixels = _pixels(384)
    scores = tower_scores(siglip, pixels, feature_layer, "auto")
    out, keys = _hooked_keys(siglip, scoring_layer, pixels)
    expected = out.attentions[scoring_layer].mean(dim=1).mean(dim=1)  # heads, then queries
    assert scores.features.shape == (2, 729, 64) and scores.importance.shape == (2, 729)
    torch.testing.assert_close(scores.features, out.hidden_states[feature_layer], **TOL)
    torch.testing.assert_close(scores.importance, expected, **TOL)
    torch.testing.assert_close(scores.keys, keys, **TOL)


def test_siglip_has_no_cls_attention(siglip):
    with pytest.raises(ValueError, match="CLS"):
        tower_scores(siglip, _pixels(384), -1, "cls")


def test_clip_received_attention_ablation_drops_the_cls_column_of_transformers_probs(clip):
    pixels = _pixels(336)
    scores = tower_scores(clip, pixels, -2, "received")
    out, keys = _hooked_keys(clip, 2, pixels)
    expected = out.attentions[2].mean(dim=1).mean(dim=1)[:, 1:]
    torch.testing.assert_close(scores.importance, expected, **TOL)
    torch.testing.assert_close(scores.keys, keys[:, 1:], **TOL)
    torch.testing.assert_close(scores.features, out.hidden_states[-2][:, 1:], **TOL)


def test_clip_auto_importance_is_the_naive_class_attention_of_transformers_projections(clip):
    """On a CLS tower `auto` is the reference's class attention: the naive single-head softmax
    of the CLS row's q over all keys, on q/k hooked from transformers' own forward."""
    pixels = _pixels(336)
    scores = tower_scores(clip, pixels, -2, "auto")
    out, queries, keys = _hooked_projections(clip, 2, pixels)
    expected = torch.stack(
        [naive_class_attention(q[0], k) for q, k in zip(queries, keys, strict=True)]
    )
    torch.testing.assert_close(scores.importance, expected, **TOL)
    torch.testing.assert_close(scores.keys, keys[:, 1:], **TOL)
    torch.testing.assert_close(scores.features, out.hidden_states[-2][:, 1:], **TOL)


@pytest.mark.parametrize("plus", [False, True])
def test_siglip_prumerge_equals_the_naive_reference_steps_on_received_attention(siglip, plus):
    """IQR fence, reference count, PruMerge+ samples on the 27x27 grid, merge by raw keys."""
    scores = tower_scores(siglip, _pixels(384), -1, "received")
    config = PruMergeConfig(mode="prumerge+" if plus else "prumerge", min_tokens=0)
    reduced = reduce_by_importance(*scores, config)
    for b, (tokens, kept) in enumerate(
        zip(reduced.split(), reduced.split_kept_indices(), strict=True)
    ):
        attn = scores.importance[b]
        ratio = naive_outlier_ratio(attn)
        expected_kept = naive_descending(attn)[: int(729 * ratio)]
        if plus:
            expected_kept = expected_kept + naive_plus_samples(expected_kept, ratio, 729)
        assert kept.tolist() == expected_kept
        expected = naive_merge(scores.features[b], attn, scores.keys[b], expected_kept, 32)
        torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)
