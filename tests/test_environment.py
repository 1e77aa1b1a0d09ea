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
@pytest.mark.script
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


# scripts/env.sh only ever replaces an environment it built itself (its marker file, or an older
# version's `.complete`). These run the script in a temporary root holding copies of scripts/ and
# requirements/, so nothing is built and this clone's .venv/ is never looked at.
def _env_root(tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "clone"
    for folder in ("scripts", "requirements"):
        shutil.copytree(ROOT / folder, root / folder)
    return root


def _run_env(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_PRUMERGE_CACHE": str(root.parent / "cache")}
    return subprocess.run(
        ["bash", str(root / "scripts" / "env.sh"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("args", [(), ("--check",)], ids=["build", "check"])
def test_env_sh_refuses_to_replace_a_venv_it_did_not_build(tmp_path, args):
    root = _env_root(tmp_path)
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("a user's own interpreter\n")
    (venv / "pyvenv.cfg").write_text("home = /somewhere\n")
    result = _run_env(root, *args)
    assert result.returncode == 1, result.stderr
    assert "was not built by scripts/env.sh" in result.stderr
    assert "nothing was changed" in result.stderr
    assert sorted(p.relative_to(venv).as_posix() for p in venv.rglob("*")) == [
        "bin",
        "bin/python",
        "pyvenv.cfg",
    ]
    assert (venv / "bin" / "python").read_text() == "a user's own interpreter\n"


@pytest.mark.parametrize(
    "contents",
    [None, {}, {".vllm-prumerge-env": "built by scripts/env.sh\n"}, {".complete": "old-key\n"}],
    ids=["absent", "empty", "marker", "older-version"],
)
def test_env_sh_would_rebuild_an_environment_it_built(tmp_path, contents):
    root = _env_root(tmp_path)
    if contents is not None:
        (root / ".venv").mkdir()
        for name, text in contents.items():
            (root / ".venv" / name).write_text(text)
    result = _run_env(root, "--check")
    assert result.returncode == 0, result.stderr
    assert f"[env] build {root / '.venv'}" in result.stderr
    assert not contents or (root / ".venv" / next(iter(contents))).exists()
