"""The documentation's commands and links (README.md, examples/README.md, docs/**/*.md).

Every command of a fenced `bash` block is checked against the thing it names, without running it
and without an engine: a `make` target against the Makefile; a `python` / `bash` script path
against the repository, and its flags against the script's own `build_parser()` (or, for a
script without one, its source); `python -m pytest` paths; `vllm serve` and `vllm bench serve`
against vLLM's own parsers, built offline the way tests/test_cli.py builds them, with the
plugin's `--plugin` hook installed; `vllm-prumerge` against `vllm_prumerge.commands`. Every
`python` block must parse, and what it imports from vllm_prumerge must exist; and every one runs,
in a temporary folder with a photo, a video file and frame images, against stand-ins for
`vllm.LLM` and `openai.OpenAI` that check what the snippet asks of them (`engine_kwargs` runs for
real and its overrides are applied to the family's config; chat requests are validated by vLLM's
own request model), and with hub ids replaced by a generated tiny checkpoint where a snippet loads
one itself (no engine, no server, no download).

The supported families are written in one place, `vllm_prumerge.serving.options.FAMILIES`; the
user-facing texts that list them must name every one.

A command that needs what no test here has carries a marker, `(needs a GPU)`,
`(needs the real weights)` or `(run by hand)`, in a comment line of its own (marks the rest of
the block) or at the end of its line. Commands that name a hub checkpoint or download weights
must be marked. Unmarked commands must be ones the tests or CI run: a script is named in tests/,
.ci/, the Makefile or scripts/, and each flag of a script or of `vllm serve` (and each variable
set in front of `vllm serve`) appears there or in the code those tests drive (benchmarks/,
examples/, vllm_prumerge/testing/) — a textual check, not a proof of coverage.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import functools
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "examples" / "README.md", *(ROOT / "docs").rglob("*.md")])

MARKER = re.compile(r"\((?:needs a GPU|needs the real weights|run by hand)\b[^)]*\)")
# Hub organisations whose checkpoints the docs name; none is reachable from CI.
HUB_ID = re.compile(r"(?<![\w/.-])(?:llava-hf|lmsys|yuzhang|openai|liuhaotian)/[\w.-]+")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", "|", ";", "&", ";;"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}
# Programs the docs use that name nothing of this repository.
UNCHECKED = {"source", "printf", "curl", "tail", "for", "done", "hf", "git", "cd"}
# What runs commands: a script that "a test or CI runs" is named in one of these.
RUNNERS = [
    *sorted((ROOT / "tests").glob("*.py")),
    ROOT / ".ci" / "run",
    ROOT / "Makefile",
    *sorted((ROOT / "scripts").iterdir()),
]
# And the code the tests drive, where the flags they exercise may be written.
DRIVEN = [
    *sorted((ROOT / "benchmarks").glob("*.py")),
    *sorted((ROOT / "examples").glob("*.py")),
    *sorted((ROOT / "vllm_prumerge" / "testing").glob("*.py")),
]


@dataclasses.dataclass(frozen=True)
class Command:
    """One simple command of a docs `bash` block: `argv` without environment assignments."""

    doc: Path
    line: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    marked: bool
    text: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {' '.join(self.argv)}"


def bash_blocks(doc: Path) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every ```bash fence of `doc`."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped.startswith("```bash"):
            current, start = [], number + 1
        elif current is not None and stripped.startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def split_substitutions(text: str) -> tuple[str, list[str]]:
    """`text` with every top-level `$(...)` replaced by `SUBST`, and the commands inside them
    (parentheses counted, quoted text skipped)."""
    out, inner, i = [], [], 0
    while i < len(text):
        if text.startswith("$(", i):
            depth, j, quote = 1, i + 2, None
            while j < len(text) and depth:
                char = text[j]
                if quote:
                    quote = None if char == quote else quote
                elif char in "'\"":
                    quote = char
                elif char in "()":
                    depth += 1 if char == "(" else -1
                j += 1
            inner.append(text[i + 2 : j - 1])
            out.append("SUBST")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out), inner


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of one logical shell line: split at `&&`, `|`, `;`, `&`, with each
    `$(...)` substitution a command of its own (its place in the line becomes `SUBST`)."""
    text, inner = split_substitutions(text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current, skip_next = [], [], False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS or set(token) <= set("<>&"):
            skip_next = True
        else:
            current.append(token)
    commands.append(current)
    for sub in inner:
        commands.extend(simple_commands(sub))
    return [c for c in commands if c]


def doc_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        for start, lines in bash_blocks(doc):
            block_marked = False
            logical, first = "", None
            for offset, line in enumerate(lines):
                if line.lstrip().startswith("#"):
                    block_marked = block_marked or bool(MARKER.search(line))
                    continue
                line = line.rstrip()
                first = start + offset if first is None else first
                if line.endswith("\\"):
                    logical += line[:-1] + " "
                    continue
                logical += line
                marked = block_marked or bool(MARKER.search(logical))
                for words in simple_commands(logical):
                    while words and words[0] in {"do", "then"}:
                        words = words[1:]
                    leading = 0
                    while leading < len(words) and ENV_ASSIGNMENT.match(words[leading]):
                        leading += 1
                    env = tuple(tuple(w.split("=", 1)) for w in words[:leading])
                    argv = tuple(words[leading:])
                    if argv and argv[0].endswith("/bin/python"):
                        argv = ("python", *argv[1:])  # an environment's own interpreter
                    if argv:
                        found.append(Command(doc, first, argv, env, marked, logical))
                logical, first = "", None
    return found


COMMANDS = doc_commands()


def _flags(argv) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


@functools.cache
def _text(files: tuple[Path, ...]) -> str:
    return "\n".join(p.read_text(errors="replace") for p in files if p.is_file())


def _mentioned(word: str, files: list[Path]) -> bool:
    """Whether `word` (not as the prefix of a longer flag or name) occurs in `files`."""
    return re.search(re.escape(word) + r"(?![\w-])", _text(tuple(files))) is not None


@functools.cache
def _make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str, capsys) -> None:
    """Parse `argv` with `parser`; an argparse error fails the test with the parser's message.
    `--help` exits 0 after printing, which counts as accepted."""
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{what}: {capsys.readouterr().err.strip().splitlines()[-1:]}")


@functools.cache
def _script_parser(path: Path) -> argparse.ArgumentParser | None:
    """The script's `build_parser()`, imported from its file (its folder first on sys.path for
    its sibling helpers, the module in sys.modules while it runs, as dataclasses need); None if
    it has none."""
    if "def build_parser" not in path.read_text():
        return None
    name = f"_docs_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module.build_parser()
    finally:
        sys.path.remove(str(path.parent))
        del sys.modules[name]


@pytest.fixture(scope="module")
def vllm_parser():
    """vLLM's CLI with the `serve` subcommand (plugin hook installed) and `bench serve`."""
    from vllm.benchmarks.serve import add_cli_args as add_bench_serve_args
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_prumerge.serving.cli import install_cli_hook

    assert install_cli_hook()
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    bench = subparsers.add_parser("bench").add_subparsers(dest="bench_type")
    add_bench_serve_args(bench.add_parser("serve"))
    return parser


def test_the_docs_have_bash_commands_to_check():
    docs = {c.doc.name for c in COMMANDS}
    assert {"README.md", "serving.md", "installation.md", "convert.md"} <= docs
    assert any(c.argv[:2] == ("vllm", "serve") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_docs_command_names_what_exists(command, vllm_parser, capsys, monkeypatch):
    argv = list(command.argv)
    program = argv[0]
    if program == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
        assert targets, f"{command}: no target"
        for target in targets:
            assert target in _make_targets(), f"{command}: no make target {target!r}"
    elif program in {"python", "bash"} and argv[1:2] == ["-m"]:
        module = argv[2]
        if module == "pytest":
            for arg in argv[3:]:
                if not arg.startswith("-"):
                    assert (ROOT / arg.split("::")[0]).exists(), f"{command}: no {arg}"
        elif not command.marked:
            assert importlib.util.find_spec(module), f"{command}: no module {module}"
    elif program in {"python", "bash"} and argv[1:2] == ["-c"]:
        pass
    elif program in {"python", "bash"}:
        script = ROOT / argv[1]
        assert script.is_file(), f"{command}: no file {argv[1]}"
        parser = _script_parser(script) if script.suffix == ".py" else None
        if parser is not None:
            _parse(parser, argv[2:], str(command), capsys)
        else:
            source = script.read_text()
            for flag in _flags(argv[2:]):
                assert flag in source, f"{command}: {argv[1]} has no {flag}"
    elif argv[:3] == ["pip", "install", "-e"]:
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", argv[3])
        assert extras, f"{command}: installs something other than this repository"
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        for extra in (extras.group(1) or "").split(","):
            assert not extra or config.has_option("options.extras_require", extra), (
                f"{command}: setup.cfg has no extra {extra!r}"
            )
    elif program == "vllm-prumerge":
        from vllm_prumerge.commands import build_parser

        _parse(build_parser(), argv[1:], str(command), capsys)
    elif program == "vllm" and argv[1:3] == ["serve", "--help=PruMerge"]:
        serve = vllm_parser._subparsers._group_actions[0].choices["serve"]
        assert "PruMerge" in [g.title for g in serve._action_groups], str(command)
    elif program == "vllm" and (argv[1:2] == ["serve"] or argv[1:3] == ["bench", "serve"]):
        for name, value in command.env:
            monkeypatch.setenv(name, value)
        _parse(vllm_parser, argv[1:], str(command), capsys)
    else:
        assert program in UNCHECKED, f"{command}: test_docs does not know how to check {program!r}"


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_docs_commands_are_run_by_tests_or_marked(command):
    text = " ".join(command.argv)
    if HUB_ID.search(text) or command.argv[:2] == ("hf", "download") or "s3://" in text:
        assert command.marked, f"{command}: needs real weights, but carries no marker"
        return
    if command.argv[:3] == ("pip", "install", "-e"):
        assert command.marked, f"{command}: a GPU install, but carries no marker"
        return
    if command.marked:
        return
    if command.argv[:2] == ("vllm", "serve"):
        for word in [*_flags(command.argv[2:]), *(name for name, _ in command.env)]:
            assert _mentioned(word, RUNNERS + DRIVEN), f"{command}: no test uses {word}; mark it"
        return
    if command.argv[0] not in {"python", "bash"} or command.argv[1] == "-c":
        return
    if command.argv[1] == "-m":
        assert command.argv[2] in {"pytest", "venv"}, f"{command}: run by no test"
        return
    script = ROOT / command.argv[1]
    assert _mentioned(script.name, RUNNERS), f"{command}: no test or CI runs this script"
    elsewhere = [p for p in RUNNERS + DRIVEN if p.resolve() != script.resolve()]
    for flag in _flags(command.argv[2:]):
        assert _mentioned(flag, elsewhere), f"{command}: no test or CI uses {flag}; mark it"


def github_anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of `doc` (duplicates get -1, -2, ...)."""
    anchors, seen, in_fence = set(), {}, False
    for line in doc.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(doc: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link of `doc` that is not a URL, outside code."""
    links, in_fence = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links


LINKS = [(doc, line, target) for doc in DOCS for line, target in relative_links(doc)]


@pytest.mark.parametrize(
    "doc, line, target", LINKS, ids=[f"{d.relative_to(ROOT)}:{n}:{t}" for d, n, t in LINKS]
)
def test_every_relative_link_resolves(doc, line, target):
    path, _, anchor = target.partition("#")
    resolved = (doc.parent / path).resolve() if path else doc
    assert resolved.exists(), f"{doc.relative_to(ROOT)}:{line}: {target} does not exist"
    assert ROOT in resolved.parents or resolved == ROOT, f"{target} leaves the repository"
    if anchor and resolved.suffix == ".md":
        assert anchor in github_anchors(resolved), (
            f"{doc.relative_to(ROOT)}:{line}: no heading #{anchor} in {resolved.relative_to(ROOT)}"
        )


def test_every_docs_page_is_reachable_from_the_readme():
    reachable, todo = set(), [ROOT / "README.md"]
    while todo:
        doc = todo.pop()
        if doc in reachable:
            continue
        reachable.add(doc)
        for _, target in relative_links(doc):
            path = target.partition("#")[0]
            linked = (doc.parent / path).resolve()
            if path.endswith(".md") and linked.is_file():
                todo.append(linked)
    orphans = [str(d.relative_to(ROOT)) for d in DOCS if d not in reachable]
    assert not orphans, f"pages no link leads to: {orphans}"


def python_blocks() -> list[tuple[Path, int, str]]:
    """(doc, first line, source) of every ```python fence of the docs."""
    blocks = []
    for doc in DOCS:
        current, start = None, 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if current is None and line.strip().startswith("```python"):
                current, start = [], number + 1
            elif current is not None and line.strip().startswith("```"):
                blocks.append((doc, start, "\n".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return blocks


PYTHON_BLOCKS = python_blocks()


@pytest.mark.parametrize(
    "doc, line, source",
    PYTHON_BLOCKS,
    ids=[f"{d.relative_to(ROOT)}:{n}" for d, n, _ in PYTHON_BLOCKS],
)
def test_python_snippets_parse_and_import_what_exists(doc, line, source):
    import ast

    tree = ast.parse(source, filename=f"{doc.relative_to(ROOT)}:{line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_prumerge"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ), f"{doc.relative_to(ROOT)}:{line}: {node.module} has no {alias.name}"


# --- Python snippets run -----------------------------------------------------------------------

_HF_CONFIGS = [  # (a word of the hub id, the transformers config class) for the stand-in engine
    ("NeXT-Video", "LlavaNextVideoConfig"),
    ("Video-LLaVA", "VideoLlavaConfig"),
    ("onevision", "LlavaOnevisionConfig"),
    ("v1.6", "LlavaNextConfig"),
    ("llava", "LlavaConfig"),
]


def _check_prumerge_kwargs(mm_processor_kwargs) -> None:
    from vllm_prumerge import PruMergeConfig

    if not mm_processor_kwargs:
        return
    assert set(mm_processor_kwargs) == {"prumerge"}, mm_processor_kwargs
    options = mm_processor_kwargs["prumerge"]
    PruMergeConfig.from_dict({"mode": options} if isinstance(options, str) else options)


class _FakeLLM:
    """`vllm.LLM` for snippets: checks the engine arguments and the prompts, runs no engine."""

    def __init__(self, model, **kwargs):
        import transformers
        from vllm.engine.arg_utils import EngineArgs

        from vllm_prumerge.serving.options import ARCHITECTURES, PruMergeOverrides

        overrides = kwargs.pop("hf_overrides")
        assert isinstance(overrides, PruMergeOverrides), "LLM(...) without engine_kwargs(...)"
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(EngineArgs)}
        assert not unknown, f"LLM(...) has no arguments {unknown}"
        name = next(cls for word, cls in _HF_CONFIGS if word.lower() in model.lower())
        config = getattr(transformers, name)()
        config.architectures = [name.replace("Config", "ForConditionalGeneration")]
        assert overrides(config).architectures[0] in ARCHITECTURES.values()

    def generate(self, prompts, sampling_params=None):
        from types import SimpleNamespace

        import numpy as np
        from PIL import Image

        outputs = []
        for prompt in prompts if isinstance(prompts, list) else [prompts]:
            for modality, data in prompt.get("multi_modal_data", {}).items():
                assert f"<{modality}>" in prompt["prompt"], (modality, prompt["prompt"])
                if modality == "image":
                    assert isinstance(data, Image.Image), type(data)
                else:
                    assert modality == "video", modality
                    assert isinstance(data, np.ndarray) and data.dtype == np.uint8, type(data)
                    assert data.ndim == 4 and data.shape[-1] == 3, data.shape
            _check_prumerge_kwargs(prompt.get("mm_processor_kwargs"))
            outputs.append(
                SimpleNamespace(outputs=[SimpleNamespace(text="...")], prompt_token_ids=[0] * 8)
            )
        return outputs


class _FakeOpenAI:
    """`openai.OpenAI` for snippets: validates each chat request with vLLM's own request model."""

    def __init__(self, base_url=None, api_key=None, **kwargs):
        from types import SimpleNamespace

        assert base_url and base_url.endswith("/v1"), base_url
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        model = SimpleNamespace(id="llava-hf/llava-1.5-7b-hf")
        self.models = SimpleNamespace(list=lambda: SimpleNamespace(data=[model]))

    @staticmethod
    def _create(*, extra_body=None, **kwargs):
        from types import SimpleNamespace

        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(**kwargs, **(extra_body or {}))
        _check_prumerge_kwargs(request.mm_processor_kwargs)
        message = SimpleNamespace(content="...")
        return SimpleNamespace(
            choices=[SimpleNamespace(message=message)], usage=SimpleNamespace(prompt_tokens=42)
        )


@pytest.fixture(scope="module")
def snippet_files(tmp_path_factory):
    """A folder with what the snippets open: photo.jpg, clip.mp4, frames/*.png, out/inputs/."""
    from vllm_prumerge.testing.scenes import make_scenes

    folder = tmp_path_factory.mktemp("snippets")
    scenes = make_scenes(3, seed=1)
    scenes[0].save(folder / "photo.jpg")
    (folder / "frames").mkdir()
    (folder / "out" / "inputs").mkdir(parents=True)
    for i, scene in enumerate(scenes):
        scene.save(folder / "frames" / f"{i:03d}.png")
        scene.save(folder / "out" / "inputs" / f"scene_{i:02d}.png")
    (folder / "clip.mp4").write_bytes(b"not decoded by the stand-in client")
    return folder


@pytest.mark.parametrize(
    "doc, line, source",
    PYTHON_BLOCKS,
    ids=[f"{d.relative_to(ROOT)}:{n}" for d, n, _ in PYTHON_BLOCKS],
)
def test_python_snippets_run(doc, line, source, snippet_files, monkeypatch):
    import openai
    import vllm

    from vllm_prumerge.testing import cached_tiny_llava

    monkeypatch.setattr(vllm, "LLM", _FakeLLM)
    monkeypatch.setattr(openai, "OpenAI", _FakeOpenAI)
    monkeypatch.chdir(snippet_files)
    if "from_pretrained(model)" in source:  # loads the checkpoint itself: a generated one
        source = HUB_ID.sub(str(cached_tiny_llava()), source)
    code = compile(source, f"{doc.relative_to(ROOT)}:{line}", "exec")
    exec(code, {"__name__": "__main__"})


# --- The supported families: one source --------------------------------------------------------


def _names_every_family(text: str, where: str) -> None:
    from vllm_prumerge.serving.options import family_names

    missing = [n for n in family_names() if not re.search(re.escape(n) + r"(?![\w-])", text)]
    assert not missing, f"{where} does not name {missing}"


def test_the_family_list_has_one_source():
    from vllm_prumerge.plugin import MODEL_CLASSES
    from vllm_prumerge.serving.options import ARCHITECTURES, FAMILIES

    assert list(FAMILIES) == list(ARCHITECTURES)
    assert set(MODEL_CLASSES) == set(ARCHITECTURES.values())


def test_user_facing_texts_name_every_family():
    import vllm_prumerge
    from vllm_prumerge.serving.cli import add_plugin_args
    from vllm_prumerge.serving.options import ARCHITECTURES, engine_kwargs

    readme = (ROOT / "README.md").read_text()
    _names_every_family(readme.split("\n\n")[1], "README.md's opening paragraph")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    _names_every_family(config.get("metadata", "description"), "setup.cfg's description")
    _names_every_family(vllm_prumerge.__doc__, "vllm_prumerge's docstring")
    _names_every_family(engine_kwargs.__doc__, "engine_kwargs's docstring")
    parser = argparse.ArgumentParser()
    add_plugin_args(parser)
    (group,) = [g for g in parser._action_groups if g.title == "PruMerge"]
    _names_every_family(group.description, "the CLI's PruMerge group")
    for page in ["README.md", "docs/compatibility.md", "docs/video.md", "docs/benchmarks.md"]:
        if page != "docs/video.md":
            _names_every_family((ROOT / page).read_text(), page)
    serving = (ROOT / "docs" / "serving.md").read_text()
    without_plugin = serving.split("## Without `--plugin`")[1].split("\n## ")[0]
    for ours in ARCHITECTURES.values():
        assert ours in without_plugin, f"docs/serving.md's --hf-overrides list lacks {ours}"
    design = (ROOT / "docs" / "design.md").read_text()
    from vllm_prumerge.plugin import MODEL_CLASSES

    for target in [*MODEL_CLASSES.values(), "vllm_prumerge.serving.video:"]:
        module = target.split(":")[0].removeprefix("vllm_prumerge.serving.")
        assert f"serving/{module}.py" in design or f"`{module}.py`" in design, module
