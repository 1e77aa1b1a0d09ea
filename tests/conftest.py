"""Shared fixtures: one generated checkpoint per test session, scenes, engine settings for CPU.

The session fails at once if `vllm_prumerge` is not imported from this clone (a stale install
elsewhere on the path would otherwise be what the tests test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every vLLM process of the test session runs on the CPU platform with a small KV cache.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Engine arguments for the tiny checkpoint: float32 for exact comparisons, no compilation.
TINY_ENGINE_ARGS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=2048,
    max_num_seqs=8,
    limit_mm_per_prompt={"image": 2},
    seed=0,
)


# Offline engines per family, shared by every module that declares `ENGINE_FAMILIES`
# (test_engine.py: images, test_engine_video.py: videos): one setting per family covers both.
OFFLINE_ENGINE_ARGS = {
    "llava": {**TINY_ENGINE_ARGS, "max_model_len": 2048},
    "llava_next": {**TINY_ENGINE_ARGS, "max_model_len": 4096},
    "siglip": {**TINY_ENGINE_ARGS, "max_model_len": 4096},
    # OneVision's stock image counts reach ~3.7k tokens on the tiny grids (two per prompt).
    "onevision": {
        **TINY_ENGINE_ARGS,
        "max_model_len": 8192,
        "limit_mm_per_prompt": {"image": 2, "video": 2},
    },
    # vLLM's class takes one video per prompt and no image.
    "next_video": {**TINY_ENGINE_ARGS, "max_model_len": 4096, "limit_mm_per_prompt": {"video": 1}},
    # The plugin's own class (vLLM 0.32 has none): images and one video per prompt.
    "video_llava": {
        **TINY_ENGINE_ARGS,
        "max_model_len": 4096,
        "limit_mm_per_prompt": {"image": 2, "video": 1},
    },
}
# The plugin's engines run with prefix caching and chunked prefill on; LLaVA-1.5's prefills at
# a 256-token budget, so a stock-size image (576) arrives in chunks.
PLUGIN_ENGINE_ARGS = {"enable_prefix_caching": True, "enable_chunked_prefill": True}
PLUGIN_FAMILY_ARGS = {"llava": {"max_num_batched_tokens": 256}}


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run against a `vllm_prumerge` imported from anywhere but this clone."""
    import vllm_prumerge

    expected = Path(__file__).resolve().parent.parent / "vllm_prumerge"
    imported = Path(vllm_prumerge.__file__).resolve().parent
    if imported != expected:
        raise pytest.UsageError(
            f"vllm_prumerge is imported from {imported}, not from the clone under test "
            f"({expected}): install this clone (`bash scripts/env.sh`) or use its .venv"
        )


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    """Path of a generated tiny LLaVA-1.5 checkpoint (hub layout), made once per session (the
    same folder as `family_checkpoint("llava", ...)`)."""
    from tests.helpers import family_checkpoint

    return family_checkpoint("llava", tmp_path_factory)


@pytest.fixture(scope="session")
def scenes():
    """Eight deterministic scene images of varied complexity (336x336)."""
    from vllm_prumerge.testing import make_scenes

    return make_scenes(8, seed=1)


def tiny_cache_env(checkpoint: str, tmp_path: Path, in_process: bool = False) -> dict[str, str]:
    """Environment in which `--tiny` resolves to the session's checkpoint (no regeneration).
    `in_process`: the script's vLLM engine runs inside the script's process (as the offline test
    engines do, tests/helpers.py `in_process_engine`), saving the engine-core and worker spawns;
    the demo and the servers keep vLLM's default multi-process layout."""
    cache = tmp_path / "cache"
    (cache / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = cache / "checkpoints" / Path(checkpoint).name
    if not link.exists():
        link.symlink_to(checkpoint, target_is_directory=True)
    from tests.helpers import cpu_env

    return cpu_env(in_process, VLLM_PRUMERGE_CACHE=str(cache))


# --- One LLaVA-1.5 `vllm serve --plugin prumerge` for the session ---------------------------
# Shared by test_server.py (its LLaVA-1.5 case), the OpenAI client example and the quality
# script's server run: requests choose their mode, and LLaVA-1.5 gets two API-server processes
# (each with its own pre-processor), as a user scaling out the front end would run it.
SERVER_ARGS = [
    *["--plugin", "prumerge", "--trust-request-mm-kwargs"],
    *["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "4"],
]
LLAVA_SERVER_ARGS = [
    *SERVER_ARGS,
    *["--limit-mm-per-prompt", '{"image": 2}'],
    *["--api-server-count", "2", "--enable-log-requests"],
]


@pytest.fixture(scope="session")
def llava_server(tiny_llava, tmp_path_factory):
    """(base URL, log path) of the session's LLaVA-1.5 server. Fails unless every served
    process logged this clone's package folder."""
    from tests.helpers import served_from_this_clone

    with served_from_this_clone(tiny_llava, LLAVA_SERVER_ARGS, tmp_path_factory) as server:
        yield server


# The session's video server: Video-LLaVA (images and videos; a model stock vLLM 0.32 cannot
# serve), `video_url` MP4s decoded by vLLM's loader. Shared by test_server.py's video cases and
# the serving benchmark's video smoke run.
VIDEO_SERVER_ARGS = [*SERVER_ARGS, "--limit-mm-per-prompt", '{"image": 1, "video": 1}']


@pytest.fixture(scope="session")
def video_llava_checkpoint(tmp_path_factory) -> str:
    from tests.helpers import family_checkpoint

    return family_checkpoint("video_llava", tmp_path_factory)


@pytest.fixture(scope="session")
def video_server(video_llava_checkpoint, tmp_path_factory):
    """(base URL, log path) of the session's Video-LLaVA server."""
    from tests.helpers import served_from_this_clone

    args = VIDEO_SERVER_ARGS
    with served_from_this_clone(video_llava_checkpoint, args, tmp_path_factory) as server:
        yield server


# --- Offline engines, one pair per family for the whole session ---------------------------------
# A module opts in with `ENGINE_FAMILIES = (...)`: its tests that take `family` are parametrized
# over them (unless they name their own families), and the session-scoped fixtures below make
# pytest run every module's tests of one family together, on one stock and one plugin engine.


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    families = getattr(metafunc.module, "ENGINE_FAMILIES", None)
    if not families or "family" not in metafunc.fixturenames:
        return
    named = any("family" in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))
    if not named:
        metafunc.parametrize("family", families, indirect=True)


@pytest.fixture(scope="session")
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def checkpoint(family, tmp_path_factory) -> str:
    from tests.helpers import family_checkpoint

    return family_checkpoint(family, tmp_path_factory)


@pytest.fixture(scope="session")
def hf(checkpoint):
    """The independent transformers pipeline of tests/hf_reference.py on the family."""
    from tests.hf_reference import reference_for

    return reference_for(checkpoint)


@pytest.fixture(scope="session")
def stock_llm(family, checkpoint, hf):
    """Stock vLLM (no plugin selected) on the family's checkpoint, in this process (OneVision:
    vLLM's default multi-process layout; in-process, stock vLLM 0.32's OneVision hands back
    3-D video embeddings, `[1, L, H]` per video, which its own sanity check refuses).
    Video-LLaVA, which vLLM 0.32 cannot serve: transformers' own model end to end stands in."""
    from vllm import LLM

    from tests.helpers import shutdown, start_llm, warm_model_info
    from tests.hf_reference import TransformersStock

    if family == "video_llava":
        yield TransformersStock(hf)
        return
    if family == "onevision":
        warm_model_info()
        llm = LLM(model=checkpoint, **OFFLINE_ENGINE_ARGS[family])
    else:
        llm = start_llm(checkpoint, **OFFLINE_ENGINE_ARGS[family])
    try:
        yield llm
    finally:
        shutdown(llm)


@pytest.fixture(scope="session")
def plugin_llm(family, checkpoint, stock_llm):
    """The plugin's engine (default mode prumerge), prefix caching and chunked prefill on;
    started after the stock engine and stopped before it; in this process."""
    from tests.helpers import shutdown, start_llm
    from vllm_prumerge import engine_kwargs

    args = {
        **OFFLINE_ENGINE_ARGS[family],
        **PLUGIN_ENGINE_ARGS,
        **PLUGIN_FAMILY_ARGS.get(family, {}),
        **engine_kwargs("prumerge"),
    }
    llm = start_llm(checkpoint, **args)
    try:
        yield llm
    finally:
        shutdown(llm)
