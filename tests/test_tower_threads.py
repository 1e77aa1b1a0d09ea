"""The tower's own thread count: `PruMergeEncoder(num_threads=N)` and, in a vLLM server, the
engine option `tower_threads` (default `auto`, see `choose_tower_threads`), which the environment
variable VLLM_PRUMERGE_TOWER_THREADS overrides.

vLLM runs multimodal pre-processing under `set_default_torch_num_threads()` (OMP_NUM_THREADS, else
one thread); the option gives the tower (and the reduction) its own count for the duration of each
encode and hands the caller's count back afterwards. What is pinned is behaviour (the thread count
every tower module sees while it runs, and after), never timing.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from tests import helpers
from vllm_prumerge import PruMergeConfig, engine_kwargs
from vllm_prumerge import encoder as encoder_module
from vllm_prumerge.encoder import (
    RESERVED_CPU_ENV,
    PruMergeEncoder,
    TowerThreads,
    choose_tower_threads,
    parse_tower_threads,
)
from vllm_prumerge.serving.options import PruMergeOverrides, request_config
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


def fresh_processor(checkpoint: str, **options):
    """A new processor (the tower's thread setting is read when it is built)."""
    return helpers.vllm_processor(checkpoint, fresh=True, mode="prumerge", **options)


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


@pytest.fixture
def three_cpus(monkeypatch):
    """This process may run on 3 CPUs (ids 0, 4, 7), whatever the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 4, 7})
    monkeypatch.delenv(RESERVED_CPU_ENV, raising=False)


@pytest.mark.parametrize(
    "env, option, expected",
    [
        (None, None, 3),  # auto: every core this process may run on
        (None, 2, 2),  # the option
        ("5", 2, 5),  # the environment variable overrides the option
    ],
)
def test_the_server_setting_reaches_the_tower_in_vllms_pre_processor(
    tiny_llava, scenes, monkeypatch, three_cpus, env, option, expected
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    kwargs = {} if option is None else {"tower_threads": option}
    processor, model_config = fresh_processor(tiny_llava, **kwargs)
    assert processor.info.encoder.num_threads == expected
    seen = record_threads(processor.info.encoder.tower)
    token_ids = process(processor, scenes[0])
    assert seen and set(seen) == {expected}
    visual = token_ids.count(model_config.hf_config.image_token_index)
    assert 2 <= visual <= 577  # a reduced count: the tower and the reduction did run


def test_the_start_up_log_states_the_thread_count_and_why(tiny_llava, monkeypatch, three_cpus):
    from vllm_prumerge.serving import base

    monkeypatch.delenv(ENV, raising=False)
    lines: list[str] = []
    monkeypatch.setattr(base.logger, "info_once", lambda msg, *args: lines.append(msg % args))
    processor, _ = fresh_processor(tiny_llava)
    processor.info.engine_config  # noqa: B018  the start-up log lines
    (line,) = [line for line in lines if "threads" in line]
    assert line.startswith("PruMerge vision tower threads: 3 (tower_threads=auto: ")
    assert "3 cores this process may run on" in line and "1 API server" in line


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


# --- The rule (`choose_tower_threads`): pure, every input injected --------------------------


@pytest.mark.parametrize(
    "cpus, api_servers, reserved, expected, why",
    [
        (range(2), 1, None, 2, "the 2 cores"),  # this project's 2-core machines: both cores
        (range(2), 2, None, 1, "the 2 cores"),  # two API servers share them
        (range(3), 2, None, 1, "the 3 cores"),  # rounded down
        (range(1), 4, None, 1, "the 1 core "),  # never below 1
        (
            range(64),
            1,
            None,
            64,
            "the 64 cores",
        ),  # vLLM's default reservation is not the front end's
        ({3, 9, 17, 40}, 1, None, 4, "the 4 cores"),  # the affinity's CPUs, whatever their ids
        (range(16), 1, "4", 4, "=4 of the 16"),  # the user kept 4 cores from vLLM's worker
        (range(16), 2, "4", 2, "=4 of the 16"),  # ... shared by the API servers
        (range(16), 3, "4", 1, "=4 of the 16"),
        (range(16), 1, "0", 16, "the 16 cores"),  # nothing reserved: the worker binds every core
        (range(16), 1, "16", 16, "the 16 cores"),  # as many as the cores: vLLM then reserves none
        (range(16), 1, "32", 16, "the 16 cores"),
        (range(16), 2, "many", 8, "the 16 cores"),  # vLLM refuses it itself; ignored here
    ],
)
def test_auto_on_a_cpu_shares_the_cores_this_process_may_run_on(
    cpus, api_servers, reserved, expected, why
):
    environ = {} if reserved is None else {RESERVED_CPU_ENV: reserved}
    threads = choose_tower_threads(
        "auto", "cpu", api_servers=api_servers, cpus=cpus, environ=environ
    )
    assert threads.count == expected
    assert threads.setting == "auto"
    assert why in threads.reason
    assert f"shared by {api_servers} API server" in threads.reason


def test_auto_reads_this_process_affinity_by_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 2, 3, 5, 8})
    assert choose_tower_threads("auto", "cpu", environ={}).count == 5
    assert choose_tower_threads("auto", "cpu", api_servers=2, environ={}).count == 2


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("mps")])
def test_on_a_gpu_auto_keeps_the_callers_count_and_says_why(device):
    threads = choose_tower_threads("auto", device, cpus=range(8), environ={})
    assert threads.count is None
    assert "does not apply" in threads.reason
    assert threads.describe().startswith("unchanged (tower_threads=auto: the tower runs on ")


def test_an_explicit_count_is_used_as_given_on_any_device():
    for device in ("cpu", "cuda"):
        threads = choose_tower_threads(6, device, api_servers=4, cpus=range(2), environ={})
        assert threads == TowerThreads(6, 6, "set explicitly")
    assert choose_tower_threads(" 3 ", "cpu", environ={}).count == 3


def test_the_environment_variable_overrides_the_option():
    environ = {ENV: "7", RESERVED_CPU_ENV: "1"}
    for setting in ("auto", 2):
        threads = choose_tower_threads(setting, "cpu", cpus=range(2), environ=environ)
        assert threads.count == 7
        assert ENV in threads.reason
    with pytest.raises(ValueError, match=ENV):
        choose_tower_threads("auto", "cpu", environ={ENV: "0"})


@pytest.mark.parametrize(
    "value, expected", [("auto", "auto"), (" AUTO ", "auto"), (4, 4), ("4", 4)]
)
def test_the_option_parses(value, expected):
    assert parse_tower_threads(value) == expected


@pytest.mark.parametrize("bad", [0, -1, "0", "two", "1.5", 1.5, True, ""])
def test_a_bad_option_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="tower_threads must be 'auto' or a positive integer"):
        parse_tower_threads(bad)
    with pytest.raises(ValueError, match="tower_threads"):
        engine_kwargs("prumerge", tower_threads=bad)
    with pytest.raises(ValueError, match="api_servers"):
        choose_tower_threads("auto", "cpu", api_servers=0, environ={})


def test_the_option_travels_in_the_hf_config_and_a_bad_dict_form_value_fails():
    from transformers import LlavaConfig

    config = LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    config = PruMergeOverrides(tower_threads=3, api_server_count=2)(config)
    assert config.prumerge_tower_threads == 3
    assert config.prumerge_api_server_count == 2
    assert "tower_threads" not in config.prumerge  # not a reduction option
    bad = LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(ValueError, match="tower_threads"):
        PruMergeOverrides(extra={"prumerge_tower_threads": "lots"})(bad)


def test_a_request_naming_the_option_is_refused():
    with pytest.raises(ValueError, match="tower_threads is an engine-level option"):
        request_config(PruMergeConfig(), {"tower_threads": 2})
