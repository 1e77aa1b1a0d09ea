"""One environment per clone: a second clone on the same machine sets itself up from the shared
download cache and never runs the first clone's code, nor makes the first run its code.

What is pinned is where `vllm_prumerge` is imported from: directly, and through the
`vllm.general_plugins` entry point that every vLLM process (engine core, workers, a `vllm serve`
subprocess, a Ray worker) loads the plugin by.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WHERE = """
import importlib.metadata as md
import sys
import vllm_prumerge
(plugin,) = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "prumerge"]
print(vllm_prumerge.__file__)
print(sys.modules[plugin.load().__module__].__file__)
"""


def _where(python: str) -> list[Path]:
    """The package file and the entry point's module file as the given interpreter imports them
    (run outside any clone, so the working directory cannot put a clone on sys.path)."""
    out = subprocess.run(
        [python, "-c", WHERE],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split()
    return [Path(p).resolve() for p in out]


def test_this_run_imports_the_clone_under_test():
    for path in _where(sys.executable):
        assert ROOT in path.parents, f"{path} is not in the clone under test ({ROOT})"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout to clone")
def test_a_second_clone_runs_its_own_code_and_leaves_the_first_ones_alone(tmp_path):
    clone = tmp_path / "second-clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    setup = subprocess.run(
        ["bash", "scripts/env.sh"], cwd=clone, capture_output=True, text=True, timeout=900
    )
    assert setup.returncode == 0, setup.stderr[-2000:]
    # A clean set-up log: the build steps and nothing alarming (pip's resolver used to print
    # ERROR lines about torchaudio / torchcodec here on a working set-up).
    assert "[env] 4/4" in setup.stderr
    assert "error" not in setup.stderr.lower(), setup.stderr
    assert "warning" not in setup.stderr.lower(), setup.stderr
    venv = Path(setup.stdout.split()[-1])
    assert venv == clone / ".venv"
    for path in _where(str(venv / "bin" / "python")):
        assert clone.resolve() in path.parents, f"second clone imports {path}"
    # Setting up the second clone did not re-point this clone's environment.
    for path in _where(sys.executable):
        assert ROOT in path.parents, f"first clone now imports {path}"
