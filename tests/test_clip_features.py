"""The CLIP feature path against transformers' own forward (hidden states, hooks, eager attention).

A small randomly initialised CLIPVisionModel with LLaVA-1.5's geometry (336 px, patch 14: 576
patches + CLS) stands in for CLIP ViT-L/14-336; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import reduce_tokens
from vllm_prumerge.testing.naive_reference import naive_class_attention, naive_prumerge
from vllm_prumerge.vision import PruMergeInputs, clip_prumerge_inputs

NUM_LAYERS = 3
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
    )


@pytest.fixture(scope="module")
def tower() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(_config()).eval()


@pytest.fixture(scope="module")
def eager_tower(tower) -> CLIPVisionModel:
    model = CLIPVisionModel._from_config(_config(), attn_implementation="eager").eval()
    model.load_state_dict(tower.state_dict())
    return model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))


def _hooked_forward(model, pixels, layer_index):
    """Transformers' full forward, capturing q_proj/k_proj outputs of one layer with hooks."""
    captured = {}
    attention = model.encoder.layers[layer_index].self_attn
    handles = [
        attention.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        attention.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    try:
        with torch.no_grad():
            outputs = model(pixels, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, captured["q"], captured["k"]


def test_the_tower_under_test_uses_fused_sdpa_attention(tower):
    assert tower.config._attn_implementation == "sdpa"


def test_features_are_the_penultimate_hidden_state_without_cls(tower, pixels):
    inputs = clip_prumerge_inputs(tower, pixels)
    outputs, _, _ = _hooked_forward(tower, pixels, -1)
    assert len(outputs.hidden_states) == NUM_LAYERS + 1
    assert inputs.features.shape == (2, 576, 64)
    torch.testing.assert_close(inputs.features, outputs.hidden_states[-2][:, 1:], **TOL)


def test_q_cls_and_keys_are_the_last_layers_raw_projections_seen_by_hooks(tower, pixels):
    inputs = clip_prumerge_inputs(tower, pixels)
    _, q, k = _hooked_forward(tower, pixels, -1)
    assert inputs.keys.shape == (2, 577, 64) and inputs.q_cls.shape == (2, 64)
    torch.testing.assert_close(inputs.q_cls, q[:, 0], **TOL)
    torch.testing.assert_close(inputs.keys, k, **TOL)


def test_split_into_heads_our_q_k_give_the_eager_towers_own_cls_attention(
    tower, eager_tower, pixels
):
    inputs = clip_prumerge_inputs(tower, pixels)
    with torch.no_grad():
        outputs = eager_tower(pixels, output_attentions=True)
    heads, head_dim = 4, 16
    q = inputs.q_cls.view(2, 1, heads, head_dim).transpose(1, 2)
    k = inputs.keys.view(2, 577, heads, head_dim).transpose(1, 2)
    per_head = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)[:, :, 0]
    torch.testing.assert_close(per_head, outputs.attentions[-1][:, :, 0], **TOL)


def test_class_attention_is_one_head_over_all_channels_as_the_reference(tower, pixels):
    inputs = clip_prumerge_inputs(tower, pixels)
    _, q, k = _hooked_forward(tower, pixels, -1)
    out = reduce_tokens(*inputs, PruMergeConfig())
    for b in range(2):
        expected = naive_class_attention(q[b, 0], k[b])
        torch.testing.assert_close(out.importance[b], expected, **TOL)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge+"])
def test_pixels_to_tokens_equal_the_naive_reference_on_hooked_tensors(tower, pixels, plus):
    inputs = clip_prumerge_inputs(tower, pixels)
    outputs, q, k = _hooked_forward(tower, pixels, -1)
    out = reduce_tokens(*inputs, PruMergeConfig(mode="prumerge+" if plus else "prumerge"))
    features = outputs.hidden_states[-2][:, 1:]
    for b in range(2):
        tokens, kept, _ = naive_prumerge(features[b], q[b, 0], k[b], plus=plus)
        assert out.split_kept_indices()[b].tolist() == kept
        torch.testing.assert_close(out.split()[b], tokens, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", [-3, -4, 0, 1, 2])
def test_other_feature_layers_score_with_the_layer_that_consumes_them(tower, pixels, layer):
    inputs = clip_prumerge_inputs(tower, pixels, vision_feature_layer=layer)
    index = layer % (NUM_LAYERS + 1)
    outputs, q, k = _hooked_forward(tower, pixels, index)
    torch.testing.assert_close(inputs.features, outputs.hidden_states[layer][:, 1:], **TOL)
    torch.testing.assert_close(inputs.q_cls, q[:, 0], **TOL)
    torch.testing.assert_close(inputs.keys, k, **TOL)


@pytest.mark.parametrize("layer", [-1, NUM_LAYERS])
def test_the_last_layers_output_is_scored_with_the_last_layers_own_attention(tower, pixels, layer):
    inputs = clip_prumerge_inputs(tower, pixels, vision_feature_layer=layer)
    outputs, q, k = _hooked_forward(tower, pixels, -1)
    torch.testing.assert_close(inputs.features, outputs.hidden_states[-1][:, 1:], **TOL)
    torch.testing.assert_close(inputs.q_cls, q[:, 0], **TOL)
    torch.testing.assert_close(inputs.keys, k, **TOL)


@pytest.mark.parametrize(
    ("layer", "error"),
    [([-2, -1], TypeError), (True, TypeError), (NUM_LAYERS + 1, ValueError), (-5, ValueError)],
)
def test_unusable_feature_layers_raise_clear_errors(tower, pixels, layer, error):
    with pytest.raises(error, match="vision_feature_layer"):
        clip_prumerge_inputs(tower, pixels, vision_feature_layer=layer)


def test_layers_past_the_scoring_layer_are_never_run(tower, pixels):
    def refuse(module, args):
        raise AssertionError("the last encoder layer must not run for vision_feature_layer=-2")

    handle = tower.encoder.layers[-1].register_forward_pre_hook(refuse)
    try:
        clip_prumerge_inputs(tower, pixels, vision_feature_layer=-2)
    finally:
        handle.remove()


def test_no_hooks_no_state_and_no_autograd_are_left_behind(tower, pixels):
    before = {name: len(m._forward_hooks) for name, m in tower.named_modules()}
    inputs = clip_prumerge_inputs(tower, pixels)
    assert {name: len(m._forward_hooks) for name, m in tower.named_modules()} == before
    assert isinstance(inputs, PruMergeInputs)
    assert not any(t.requires_grad for t in inputs)


def test_a_module_wrapping_the_tower_as_vision_model_is_accepted(tower, pixels):
    wrapper = torch.nn.Module()
    wrapper.vision_model = tower
    direct, wrapped = clip_prumerge_inputs(tower, pixels), clip_prumerge_inputs(wrapper, pixels)
    for a, b in zip(direct, wrapped, strict=True):
        assert torch.equal(a, b)


def test_a_module_without_a_clip_tower_is_rejected(pixels):
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        clip_prumerge_inputs(torch.nn.Linear(2, 2), pixels)


def test_a_bfloat16_tower_gives_bfloat16_inputs_and_reduces(tower, pixels):
    low = CLIPVisionModel(_config()).eval()
    low.load_state_dict(tower.state_dict())
    low = low.to(torch.bfloat16)
    inputs = clip_prumerge_inputs(low, pixels)
    assert all(t.dtype == torch.bfloat16 for t in inputs)
    with torch.no_grad():
        expected = low(pixels.to(torch.bfloat16), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(inputs.features, expected[:, 1:], atol=0.05, rtol=0.02)
    out = reduce_tokens(*inputs, PruMergeConfig(mode="prumerge+"))
    assert out.features.dtype == torch.bfloat16
    assert out.features.shape[0] == sum(out.host_lengths)
