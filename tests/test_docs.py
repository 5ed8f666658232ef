"""The docs check: README.md and docs/*.md say what the code does, and cannot drift from it silently.

- Every fenced ```python / ```bash block is run here, or is marked by an HTML comment on the line right before it
  (the convention, documented in docs/architecture.md):

      <!-- not run: REASON -->    not run; the reason is required, and a tests/*.py file it names must exist
      <!-- run: slow -->          run, in a test marked slow
      (no comment)                run in the default test

  Python blocks run in-process, each in a fresh namespace and an empty working directory; bash blocks run with
  `bash -euo pipefail` in an empty directory that links the repository's examples/, benchmarks/, tests/, src/ and
  model_cards/.
- Every relative link (and image) in README.md and docs/*.md points at a file of the repository, and every
  `#anchor` at a heading (GitHub's anchor rules) or an `<a id>` of the target page.
- The reference tables are checked against the code: docs/configuration.md against `VMoEConfig`'s fields, types and
  defaults; the presets table of
  docs/mobile-vmoe-recipe.md against `hf_vmoe.recipes.presets`; the README's results table against the committed records it
  links; docs/architecture.md's module list and dependency rule against src/hf_vmoe/.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "src" / "hf_vmoe"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PYTHON = {"python", "py"}
BASH = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^\s*<!--\s*(not run|run)\s*:\s*(.*?)\s*-->\s*$")
LINKED_DIRS = ("examples", "benchmarks", "tests", "src", "model_cards")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------------------------------
# Markdown parsing
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("not run" | "run", text)

    @property
    def id(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.group(1), opening.group(2), opening.group(3).lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0]) * len(fence)}{re.escape(fence[0])}*\s*$",
                                              lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        found = MARKER.match(previous)
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", found.groups() if found else None))
    return blocks


def prose_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced blocks, with inline code removed."""
    out, fence = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if opening:
            mark = opening.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence) and not line.strip()[len(mark):].strip():
                fence = None
            continue
        if fence is None:
            out.append((number, re.sub(r"`[^`]*`", "", line)))
    return out


def github_anchor(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in prose_lines_with_code(page):
        heading = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = github_anchor(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        for name in re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line):
            found.add(name)
    return found


def prose_lines_with_code(page: Path) -> list[tuple[int, str]]:
    """Like `prose_lines`, but keeping inline code (headings may contain it)."""
    keep = {n for n, _ in prose_lines(page)}
    return [(n, line) for n, line in enumerate(page.read_text().splitlines(), 1) if n in keep]


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)")
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"")


def links(page: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(page):
        for pattern in (LINK, REF_LINK, HTML_LINK):
            out += [(number, target) for target in pattern.findall(line)]
    return out


def table_rows(page: Path, header: list[str]) -> list[list[str]]:
    """The rows of every table whose header cells are `header` (cells stripped)."""
    lines = page.read_text().splitlines()
    split = lambda line: [cell.strip().replace("\\|", "|")  # noqa: E731  (a `\|` inside a cell is a pipe)
                          for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
    rows, found = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("|") and [c.lower() for c in split(line)] == header:
            found = True
            for row in lines[i + 2:]:
                if not row.lstrip().startswith("|"):
                    break
                rows.append(split(row))
    assert found, f"{rel(page)} has no table with the header {header}"
    return rows


def code(cell: str) -> str:
    """The text of a cell that is one inline-code span."""
    match = re.fullmatch(r"`(.*)`", cell.strip())
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


# ------------------------------------------------------------------------------------------------------------------
# Every command block: run, or marked as not run
# ------------------------------------------------------------------------------------------------------------------

ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page) if b.lang in PYTHON | BASH]


def test_pages_have_command_blocks():
    assert len(ALL_BLOCKS) > 20


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_every_block_is_run_or_marked_not_run(block):
    if block.marker is None:
        return  # run by test_fast_blocks_run
    kind, text = block.marker
    if kind == "run":
        assert text == "slow", f"{block.id}: the only run marker is <!-- run: slow -->, got {text!r}"
        return
    assert len(text.split()) >= 2, f"{block.id}: say why the block is not run, e.g. <!-- not run: needs a GPU -->"
    for named in re.findall(r"(?:tests|benchmarks|examples)/[\w/.-]+\.(?:py|sh)", text):
        assert (ROOT / named).is_file(), f"{block.id}: the marker names {named}, which does not exist"


def _bash_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_block(block: Block, tmp_path: Path, monkeypatch) -> None:
    if block.lang in PYTHON:
        monkeypatch.chdir(tmp_path)
        namespace = {"__name__": "__docs__"}
        exec(compile(block.code, block.id, "exec"), namespace)  # noqa: S102 - the documented snippet
        return
    for name in LINKED_DIRS:
        (tmp_path / name).symlink_to(ROOT / name)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path, env=_bash_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.marker is None], ids=lambda b: b.id)
def test_fast_blocks_run(block, tmp_path, monkeypatch):
    run_block(block, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.marker == ("run", "slow")], ids=lambda b: b.id)
def test_slow_blocks_run(block, tmp_path, monkeypatch):
    run_block(block, tmp_path, monkeypatch)


def test_readme_quick_start_is_what_ci_runs():
    """The README's first block holds the two quick-start commands; tests/test_demo.py runs the demo (--quick) and
    .ci/run runs the test command on a fresh venv, which is why the block itself is marked not run."""
    first = fenced_blocks(ROOT / "README.md")[0]
    assert first.lang == "bash" and first.line <= 5, "the quick-start block comes first"
    commands = [line for line in first.code.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("hf-vmoe demo"), commands
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command == "python -m pytest -q tests"
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in commands[0] and "pip install -q torch==2.13.0" in (ROOT / ".ci" / "run").read_text()
    assert '"demo"' in (ROOT / "tests" / "test_demo.py").read_text()


# ------------------------------------------------------------------------------------------------------------------
# Links
# ------------------------------------------------------------------------------------------------------------------

ALL_LINKS = [(page, number, target) for page in PAGES for number, target in links(page)]


def test_links_are_found():
    assert len(ALL_LINKS) > 30


@pytest.mark.parametrize("page, number, target", ALL_LINKS, ids=[f"{rel(p)}:{n}:{t}" for p, n, t in ALL_LINKS])
def test_relative_links_resolve(page, number, target):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        return
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    where = f"{rel(page)}:{number}: link {target!r}"
    assert resolved == ROOT or ROOT in resolved.parents, f"{where} leaves the repository"
    assert resolved.exists(), f"{where}: {rel(resolved)} does not exist"
    if anchor:
        assert resolved.suffix == ".md", f"{where}: anchors are only checked in Markdown pages"
        assert anchor in anchors(resolved), f"{where}: no heading #{anchor} in {rel(resolved)}"


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index():
    linked = set()
    for page in (ROOT / "README.md",):
        linked |= {(page.parent / t.partition("#")[0]).resolve() for _, t in links(page) if t.partition("#")[0]}
    missing = [rel(p) for p in DOCS.glob("*.md") if p.resolve() not in linked and p.name != "README.md"]
    assert not missing, f"not linked from README.md: {missing}"


# ------------------------------------------------------------------------------------------------------------------
# Reference tables against the code
# ------------------------------------------------------------------------------------------------------------------


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def test_configuration_table_matches_vmoeconfig():
    from hf_vmoe import VMoEConfig

    own = set(VMoEConfig.__annotations__)
    fields = {f.name: f for f in dataclasses.fields(VMoEConfig) if f.name in own}
    rows = table_rows(DOCS / "configuration.md", ["field", "type", "default", "meaning"])
    documented = {}
    for row in rows:
        name = code(row[0])
        assert name not in documented, f"{name} documented twice"
        documented[name] = row
    expected = {name.lstrip("_"): name for name in fields}  # `_out_features` is the `out_features` argument
    assert set(documented) == set(expected), (
        f"missing from docs/configuration.md: {sorted(set(expected) - set(documented))}; "
        f"not VMoEConfig fields: {sorted(set(documented) - set(expected))}"
    )
    for name, (_, type_cell, default_cell, meaning) in documented.items():
        field = fields[expected[name]]
        assert code(type_cell) == _type_name(field.type), f"{name}: type {type_cell} != {_type_name(field.type)}"
        assert ast.literal_eval(code(default_cell)) == field.default, f"{name}: default {default_cell} != {field.default!r}"
        assert len(meaning.split()) >= 3, f"{name}: say what the field means"








def test_presets_table_matches_the_presets():
    from hf_vmoe.recipes.presets import format_preset_table, preset_table

    page = (DOCS / "mobile-vmoe-recipe.md").read_text()
    generated = format_preset_table(preset_table(), markdown=True).splitlines()
    rows = [line for line in generated if line.startswith("|")]
    missing = [row for row in rows if row not in page]
    assert not missing, "regenerate the presets table with `hf-vmoe presets`:\n" + "\n".join(missing)


def _tracked(path: Path) -> bool | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    result = subprocess.run(["git", "ls-files", "--error-unmatch", rel(path)], cwd=ROOT, capture_output=True)
    return result.returncode == 0


def test_readme_results_come_from_committed_records():
    rows = table_rows(ROOT / "README.md", ["result", "figure", "record"])
    assert 4 <= len(rows) <= 10
    for what, figure, record in rows:
        targets = LINK.findall(record)
        assert targets, f"{what}: link the record the figure comes from"
        numbers = re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?%?", figure)
        assert numbers, f"{what}: no figure in {figure!r}"
        texts = []
        for target in targets:
            path = (ROOT / target.partition("#")[0]).resolve()
            assert path.is_file(), f"{what}: {target} does not exist"
            assert _tracked(path) is not False, f"{what}: {target} is not committed"
            texts.append(path.read_text())
        for number in numbers:
            assert any(number in text for text in texts), f"{what}: {number} is not in {targets}"


def _imports_of_ours(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("hf_vmoe")):
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hf_vmoe")}
    return {name.removeprefix("hf_vmoe.") for name in found}


def test_checkpoint_files_import_only_each_other():
    """docs/architecture.md's dependency rule: what remote code copies imports nothing else of ours."""
    assert _imports_of_ours(PACKAGE / "configuration_vmoe.py") == set()
    assert _imports_of_ours(PACKAGE / "image_processing_vmoe.py") == set()
    assert _imports_of_ours(PACKAGE / "modeling_vmoe.py") <= {"configuration_vmoe"}


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top in ("configuration_vmoe", "modeling_vmoe", "image_processing_vmoe", ""):
        return "checkpoint"
    return top if top in ("recipes", "integrations") else "apps"


ALLOWED = {"checkpoint": {"checkpoint"}, "recipes": {"checkpoint", "recipes"},
           "integrations": {"checkpoint", "recipes", "integrations"},
           "apps": {"checkpoint", "recipes", "integrations", "apps"}}


@pytest.mark.parametrize("path", sorted((PACKAGE / "recipes").rglob("*.py")) + sorted((PACKAGE / "integrations").rglob("*.py")),
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_point_one_way(path):
    """checkpoint <- recipes <- integrations <- apps: a module imports only its own layer and the ones below."""
    package = list(path.relative_to(PACKAGE).parent.parts)  # e.g. ["integrations", "vmoe_checkpoint"]
    layer = package[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # resolve the relative import against the module's package (hf_vmoe.<layer>[.<subpackage>])
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_vmoe"):
            target = node.module.removeprefix("hf_vmoe").lstrip(".")
        else:
            continue
        assert _layer(target) in ALLOWED[layer], f"{path.name} (a {layer} module) imports {target or 'hf_vmoe'}"


DOCUMENTED_IMPORT = re.compile(r"^\s*from (hf_vmoe[\w.]*) import \(?([\w, ]+)", re.M)
DOCUMENTED_PATH = re.compile(r"`(hf_vmoe(?:\.\w+)+)`")


def _documented_imports() -> dict[str, set[str]]:
    """Every `from hf_vmoe... import names` and every `hf_vmoe.a.b` code span in README.md and docs/."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        text = page.read_text()
        for module, names in DOCUMENTED_IMPORT.findall(text):
            found.setdefault(module, set()).update(n.strip() for n in names.split(",") if n.strip())
        for dotted in DOCUMENTED_PATH.findall(text):
            found.setdefault(dotted, set())
    return found


def test_every_documented_import_path_works():
    import importlib
    import warnings

    documented = _documented_imports()
    assert len(documented) > 10
    for dotted, names in sorted(documented.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # docs use current paths and names, nothing deprecated
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ModuleNotFoundError:
                    continue
            for attribute in parts[cut:]:
                assert hasattr(obj, attribute), f"{dotted}: {'.'.join(parts[:cut])} has no {attribute}"
                obj = getattr(obj, attribute)
        for name in names:
            assert hasattr(obj, name), f"docs import {name} from {dotted}, which has no such name"


def test_architecture_page_names_every_module():
    page = (DOCS / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", page))
    modules = sorted(
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
        if not {"metrics", "data", "__pycache__"} & set(p.relative_to(PACKAGE).parts[:-1])
    )
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/architecture.md does not describe: {missing}"


# ------------------------------------------------------------------------------------------------------------------
# docs/errors.md: every row's call raises the error the row shows
# ------------------------------------------------------------------------------------------------------------------

ERRORS_PAGE = DOCS / "errors.md"
ERROR_ROWS = table_rows(ERRORS_PAGE, ["cause", "call", "error"])


def test_error_tables_have_rows():
    assert len(ERROR_ROWS) >= 30


@pytest.fixture(scope="module")
def errors_namespace(tmp_path_factory):
    """The page's setup block, run once in a scratch directory (it saves the checkpoints the rows load)."""
    setup = [b for b in fenced_blocks(ERRORS_PAGE) if b.lang in PYTHON]
    assert len(setup) == 1, "docs/errors.md has one python block: the setup every row runs after"
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("errors"))
    namespace = {"__name__": "__docs__", "__cwd__": os.getcwd()}
    exec(compile(setup[0].code, setup[0].id, "exec"), namespace)  # noqa: S102 - the documented setup
    yield namespace
    os.chdir(cwd)


@pytest.mark.parametrize("cause, call, error", ERROR_ROWS, ids=[row[0] for row in ERROR_ROWS])
def test_error_row(cause, call, error, errors_namespace, monkeypatch):
    """The row's error cell is `Type: message`, `...` marking omitted parts; the call must raise exactly that."""
    expected_type, _, message = code(error).partition(": ")
    setup_dir = errors_namespace.get("__cwd__")
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is checked against the row below
        if setup_dir:
            monkeypatch.chdir(setup_dir)
        eval(code(call), errors_namespace)  # noqa: S307 - the documented call
    names = [klass.__name__ for klass in type(caught.value).__mro__]
    assert expected_type in names, f"{cause}: raised {type(caught.value).__name__}, the page says {expected_type}"
    text, position = str(caught.value), 0
    for piece in (p for p in message.split("...") if p):
        found = text.find(piece, position)
        assert found >= 0, f"{cause}: {piece!r} is not in the message (after position {position}):\n{text}"
        position = found + len(piece)


def test_every_public_name_exists():
    """Each module's `__all__` names only what it defines: a stale name breaks `from module import *` and the docs
    that list the module's API."""
    import importlib
    import pkgutil

    import hf_vmoe

    for info in pkgutil.walk_packages(hf_vmoe.__path__, "hf_vmoe."):
        module = importlib.import_module(info.name)
        missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
        assert not missing, f"{info.name}.__all__ names {missing}, which it does not define"
