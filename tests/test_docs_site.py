"""The documentation site (mkdocs.yml): `make docs`'s strict build passes, into a temporary folder.

`mkdocs build --strict` fails on a broken link or anchor, a page left out of the navigation, and
an API reference (mkdocstrings) that names something the package does not have. A few seconds,
no engine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("_mkdocs_hooks", ROOT / "scripts/mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_docs_builds_the_site_strictly(tmp_path):
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs:", make, flags=re.MULTILINE)
    assert 'mkdocs" build --strict' in make
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for page in ["index.html", "overview/index.html", "quickstart/index.html", "video/index.html"]:
        assert (site / page).is_file(), page
    for page in ["troubleshooting", "compatibility", "changelog", "results", "examples"]:
        assert (site / page / "index.html").is_file(), page
    api = (site / "api" / "index.html").read_text()
    # The reference is generated from the docstrings, not written by hand.
    for name in ["engine_kwargs", "PruMergeConfig", "token_buckets", "token_map", "draw_filmstrip"]:
        assert re.search(rf'id="vllm_prumerge\.[\w.]*{name}"', api), name
    assert "budget_ratio" in api and "tower_dtype" in api


def test_repository_links_become_site_links():
    rewrite = _hooks().rewrite_links
    page = "See [serve](../README.md#serve), [run](../examples/demo.py) and [m](models.md)."
    assert rewrite(page, "serving.md") == (
        "See [serve](overview.md#serve), run and [m](models.md)."
    )
    assert rewrite("[s](docs/serving.md#server)", "overview.md") == "[s](serving.md#server)"
    assert rewrite("[n](../serving.md)", "notes/ray-data.md") == "[n](../serving.md)"
    assert rewrite("```\n[x](../README.md)\n```", "serving.md") == "```\n[x](../README.md)\n```"
