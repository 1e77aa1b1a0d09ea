"""The tower's own thread count: `PruMergeEncoder(num_threads=N)` and, in a vLLM server, the
environment variable VLLM_PRUMERGE_TOWER_THREADS.

vLLM runs multimodal pre-processing under `set_default_torch_num_threads()` (OMP_NUM_THREADS, else
one thread); the option gives the tower (and the reduction) its own count for the duration of each
encode and hands the caller's count back afterwards. What is pinned is behaviour (the thread count
every tower module sees while it runs, and after), never timing.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from tests import helpers
from vllm_prumerge import PruMergeConfig
from vllm_prumerge import encoder as encoder_module
from vllm_prumerge.encoder import PruMergeEncoder
from vllm_prumerge.vision import tower_scores

ENV = PruMergeEncoder.THREADS_ENV


def record_threads(tower: torch.nn.Module) -> list[int]:
    """Hook every module of the tower: the torch thread count each one starts with."""
    seen: list[int] = []
    for module in tower.modules():
        module.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    return seen


@pytest.fixture
def caller_threads():
    """Run the test with the caller at 1 thread (as vLLM's pre-processor), restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


def pixels(checkpoint: str, images) -> torch.Tensor:
    return AutoProcessor.from_pretrained(checkpoint).image_processor(
        images=images, return_tensors="pt"
    )["pixel_values"]


def test_encode_runs_every_tower_module_with_its_thread_count_and_restores_the_callers(
    tiny_llava, scenes, caller_threads
):
    vision = AutoConfig.from_pretrained(tiny_llava).vision_config
    encoder = PruMergeEncoder(tiny_llava, vision, device="cpu", num_threads=3)
    seen = record_threads(encoder.tower)
    encoded = encoder.encode(pixels(tiny_llava, scenes[:2]), PruMergeConfig())
    assert len(encoded.features) == 2
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == caller_threads


def test_without_a_thread_count_the_tower_keeps_the_callers(tiny_llava, scenes, caller_threads):
    vision = AutoConfig.from_pretrained(tiny_llava).vision_config
    encoder = PruMergeEncoder(tiny_llava, vision, device="cpu")
    seen = record_threads(encoder.tower)
    encoder.encode(pixels(tiny_llava, scenes[:1]), PruMergeConfig())
    assert seen and set(seen) == {caller_threads}


def test_the_callers_thread_count_is_restored_when_encode_fails(tiny_llava, caller_threads):
    vision = AutoConfig.from_pretrained(tiny_llava).vision_config
    encoder = PruMergeEncoder(tiny_llava, vision, device="cpu", num_threads=2)
    with pytest.raises(RuntimeError):  # 4 channels: the patch convolution refuses it
        encoder.encode(torch.zeros(1, 4, 336, 336), PruMergeConfig())
    assert torch.get_num_threads() == caller_threads


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_a_thread_count_that_is_not_a_positive_integer_is_refused(tiny_llava, bad):
    vision = AutoConfig.from_pretrained(tiny_llava).vision_config
    with pytest.raises(ValueError, match="num_threads"):
        PruMergeEncoder(tiny_llava, vision, num_threads=bad)


def test_the_environment_variable_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert PruMergeEncoder.threads_from_env() is None
    monkeypatch.setenv(ENV, "")
    assert PruMergeEncoder.threads_from_env() is None
    monkeypatch.setenv(ENV, " 4 ")
    assert PruMergeEncoder.threads_from_env() == 4
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            PruMergeEncoder.threads_from_env()


def fresh_processor(checkpoint: str):
    """A new processor (the tower's thread setting is read when it is built)."""
    return helpers.vllm_processor(checkpoint, fresh=True, mode="prumerge")


def process(processor, *images) -> list[int]:
    """One prompt with `images` through `processor.apply`, under vLLM's pre-processing thread
    setting (OMP_NUM_THREADS unset: 1 thread); the prompt token ids."""
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.utils.torch_utils import set_default_torch_num_threads

    text = "USER: " + "<image>\n" * len(images) + "What is this? ASSISTANT:"
    inputs = ProcessorInputs(
        prompt=processor.info.get_tokenizer().encode(text),
        mm_data_items=processor.info.parse_mm_data({"image": list(images)}),
        hf_processor_mm_kwargs={"prumerge": "prumerge"},
    )
    with set_default_torch_num_threads():
        assert torch.get_num_threads() == 1
        result = processor.apply(inputs, TimingContext())
        assert torch.get_num_threads() == 1  # handed back to vLLM's setting
    return result["prompt_token_ids"]


@pytest.mark.parametrize("setting, expected", [(None, 1), ("2", 2)])
def test_the_server_setting_reaches_the_tower_in_vllms_pre_processor(
    tiny_llava, scenes, monkeypatch, setting, expected
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if setting is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, setting)
    processor, model_config = fresh_processor(tiny_llava)
    assert processor.info.encoder.num_threads == (None if setting is None else expected)
    seen = record_threads(processor.info.encoder.tower)
    token_ids = process(processor, scenes[0])
    assert seen and set(seen) == {expected}
    visual = token_ids.count(model_config.hf_config.image_token_index)
    assert 2 <= visual <= 577  # a reduced count: the tower and the reduction did run


def test_a_bad_server_setting_fails_with_the_variables_name(tiny_llava, monkeypatch):
    monkeypatch.setenv(ENV, "many")
    processor, _ = fresh_processor(tiny_llava)
    with pytest.raises(ValueError, match=ENV):
        processor.info.encoder  # noqa: B018  the property builds the encoder


def test_each_image_of_a_request_goes_through_the_tower_alone(tiny_llava, scenes, monkeypatch):
    """Batch invariance: a forward of batch 1 per image, so an image's features never depend on
    its companions (tests/test_batch_invariance.py pins the features themselves)."""
    monkeypatch.delenv(ENV, raising=False)
    processor, model_config = fresh_processor(tiny_llava)
    batches: list[int] = []
    tower = processor.info.encoder.tower
    embeddings = next(m for name, m in tower.named_modules() if name.endswith("embeddings"))
    embeddings.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    token_ids = process(processor, *scenes[:3])
    assert batches == [1, 1, 1]
    visual = token_ids.count(model_config.hf_config.image_token_index)
    assert 3 * 2 <= visual <= 3 * 577


def test_encodes_that_set_a_thread_count_never_overlap_across_threads(
    tiny_llava, scenes, caller_threads, monkeypatch
):
    """torch's thread count is process-wide, so an encode that sets it must not run while
    another thread's encode sets and restores it: such encodes are serialised. A slow hook
    makes overlapping forwards near-certain if they were not."""
    import threading
    import time

    vision = AutoConfig.from_pretrained(tiny_llava).vision_config
    encoder = PruMergeEncoder(tiny_llava, vision, device="cpu", num_threads=3)
    seen = record_threads(encoder.tower)
    events: list[tuple[str, int]] = []

    def timed_tower_scores(*args, **kwargs):
        events.append(("start", threading.get_ident()))
        time.sleep(0.02)
        try:
            return tower_scores(*args, **kwargs)
        finally:
            events.append(("end", threading.get_ident()))

    monkeypatch.setattr(encoder_module, "tower_scores", timed_tower_scores)
    batch = pixels(tiny_llava, scenes[:2])
    threads = [
        threading.Thread(target=encoder.encode, args=(batch, PruMergeConfig())) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(events) == 3 * 2 * 2  # three encodes, two images each, start and end
    # Forwards never interleave: each start is followed by its own end ...
    forwards = list(zip(events[::2], events[1::2], strict=True))
    for (kind, owner), end in forwards:
        assert kind == "start" and end == ("end", owner)
    # ... and an encode's two forwards run back to back (the lock spans the whole encode).
    owners = [owner for (_, owner), _ in forwards]
    assert all(owners[i] == owners[i + 1] for i in range(0, len(owners), 2))
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == caller_threads
