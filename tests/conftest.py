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


def tiny_cache_env(checkpoint: str, tmp_path: Path) -> dict[str, str]:
    """Environment in which `--tiny` resolves to the session's checkpoint (no regeneration)."""
    cache = tmp_path / "cache"
    (cache / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = cache / "checkpoints" / Path(checkpoint).name
    if not link.exists():
        link.symlink_to(checkpoint, target_is_directory=True)
    return {
        **os.environ,
        "VLLM_PRUMERGE_CACHE": str(cache),
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
