"""MkDocs hooks of the documentation site (`mkdocs.yml`, `make docs`).

The site is built from docs/, plus the pages that live elsewhere in the repository so that they
read well on their own: README.md (the site's "Overview"), examples/README.md, CHANGELOG.md and
benchmarks/RESULTS.md. Their files stay where they are; these hooks add them to the site and
rewrite every relative link written for the repository's layout (`../README.md#serve`,
`docs/serving.md`) into the site's, so the same Markdown works on a code host and on the site. A
link to a repository file that is not a page (a script, a test) keeps its text without the link.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# Repository pages outside docs/ -> their path on the site.
OUTSIDE = {
    "README.md": "overview.md",
    "examples/README.md": "examples.md",
    "CHANGELOG.md": "changelog.md",
    "benchmarks/RESULTS.md": "results.md",
}
_SITE_TO_REPO = {site: repo for repo, site in OUTSIDE.items()}
_LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:")


def on_files(files, config):
    for repo, site in OUTSIDE.items():
        files.append(File.generated(config, site, abs_src_path=str(ROOT / repo)))
    return files


def _site_target(repo_path: str) -> str | None:
    """The site path of a repository path, or None when the site does not have it."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    return OUTSIDE.get(repo_path)


def rewrite_links(markdown: str, page_site_path: str) -> str:
    """`markdown` of the page at `page_site_path` with its repository-relative links made
    site-relative (fenced code untouched)."""
    repo_page = _SITE_TO_REPO.get(page_site_path, "docs/" + page_site_path)
    here = posixpath.dirname(page_site_path)

    def fix(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        if _URL.match(target) or target.startswith("#"):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(repo_page), path))
        site = _site_target(repo_target)
        if site is None:
            return text  # a repository file that is not a page of the site
        return f"[{text}]({posixpath.relpath(site, here or '.')}{hash_}{anchor})"

    out, in_fence = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence else _LINK.sub(fix, line))
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    return rewrite_links(markdown, page.file.src_uri)
