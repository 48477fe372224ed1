"""The documentation tells the truth about the code (beyond the paper): README.md and docs/*.md checked against it.

What a shown command is, and how it is read (the rule ``docs/cli.md`` states for readers):

* **Full parse**: every line of a ```bash / ```sh / ```shell / ```console block, and every table cell that is one
  code span, starting with ``kaleido `` or ``torchrun … -m kaleido_bert.cli``. The line is normalised (a trailing
  ``# comment`` dropped, ``[...]`` optional parts removed, ``…`` dropped, ``a|b`` and ``{a,b}`` → their first
  alternative, the number placeholders ``N M S P`` → numbers, ``\\|`` table escapes undone) and parsed by
  ``kaleido_bert.cli.build_parser()`` exactly as ``kaleido`` would (``kaleido patches CAT`` is ``patches extract``,
  as in ``cli.main``). A RUN argument must exist (the parser checks it), so parsing runs in a temporary directory
  holding the run paths of :data:`RUN_PATHS`; a command that cannot parse there belongs in :data:`SKIPPED`, with its
  reason.
* **Light check**: every other inline code span starting with ``kaleido `` names a real subcommand and only options
  that subcommand has.
* ``python benchmarks/X.py …`` (block or span): the script exists and declares every ``--option`` given (an
  ``add_argument`` call in the script; their parsers are built inside ``main``, so they are read, not run).
* ``make X`` (block or span): the Makefile has the target X.

Also: no reference to documents outside the repository (``../shared``, SPEC, issue numbers); README.md ≤ 150 lines;
relative links (and their ``#anchors``) and backticked repository paths exist; the results tables' numbers are those
of the result file they cite; every subcommand is on ``docs/cli.md``; the presets table matches the presets; every
module of the package is in ``docs/method.md``'s layout table. No tensors here.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from kaleido_bert.cli import PATCH_COMMANDS, build_parser
from kaleido_bert.config import PRESET_NAMES, load_config
from kaleido_bert.errors import KaleidoError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "src" / "kaleido_bert"
SHELL_FENCES = {"bash", "sh", "shell", "console"}
README_MAX_LINES = 150

RUN_PATHS = ("RUN", "runs/demo", "runs/myrun")
"""Run directories the docs' commands name: they exist in the directory where the commands are parsed."""
NUMBER_PLACEHOLDERS = {"N": "2", "M": "1", "S": "0", "P": "8000"}
"""Placeholders for numbers (``--products N``): replaced before parsing, since the parser checks their type."""
SKIPPED: dict[str, str] = {}
"""Shown command text → why it cannot be parsed. Empty: every shown command parses."""
BACKBONE_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "efficientnet_lite0": "EfficientNet-Lite0"}
"""How the presets table names each backbone a preset may use."""
RESULT_TABLES = {  # document → (the section holding the table, the result file its numbers come from)
    "README.md": ("## Results on real data", "benchmarks/results/quality-classweights.md"),
    "docs/real-catalogues.md": ("## Results on real data", "benchmarks/results/quality-classweights.md"),
}


def name_of(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Shown:
    """A command shown in a document: where, its text, and ``block`` / ``cell`` (full parse) or ``span``."""

    file: str
    line: int
    text: str
    kind: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def prose_and_blocks(text: str) -> tuple[str, list[tuple[str, int, str]]]:
    """The text with fenced blocks blanked (line numbers kept) and each fenced line as (language, line, text)."""
    prose, blocks, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            prose.append("")
        elif fence is not None:
            blocks.append((fence, number, line))
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def table_cells(line: str) -> list[str]:
    """The cells of a markdown table row (``\\|`` is a pipe inside a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def shown_in(path: Path) -> list[Shown]:
    """Every command shown in ``path``: shell block lines, command table cells and inline code spans."""
    name = name_of(path)
    prose, blocks = prose_and_blocks(path.read_text())
    found = [Shown(name, number, line.strip(), "block") for fence, number, line in blocks
             if fence in SHELL_FENCES and line.strip() and not line.lstrip().startswith("#")]
    cells = set()
    for number, line in enumerate(prose.splitlines(), 1):
        if line.startswith("|"):
            for cell in table_cells(line):
                span = re.fullmatch(r"`([^`]+)`", cell)
                if span and span.group(1).startswith(("kaleido ", "torchrun ")):
                    found.append(Shown(name, number, span.group(1), "cell"))
                    cells.add((number, span.group(1)))
    for span in re.finditer(r"`([^`]+)`", prose):
        number = prose.count("\n", 0, span.start()) + 1
        text = " ".join(span.group(1).split())  # a span may wrap over two lines
        if (number, span.group(1)) not in cells and text.startswith(("kaleido ", "python benchmarks/", "make ")):
            found.append(Shown(name, number, text, "span"))
    return found


SHOWN = [shown for doc in DOCUMENTS for shown in shown_in(doc)]
FULL = [s for s in SHOWN if s.kind in ("block", "cell") and s.text.startswith(("kaleido ", "torchrun "))]
LIGHT = [s for s in SHOWN if s.kind == "span" and s.text.startswith("kaleido ")]
BENCH = [s for s in SHOWN if s.text.startswith("python benchmarks/")]
MAKE = [s for s in SHOWN if s.text.startswith("make ")]


def words_of(shown: str) -> list[str]:
    """The normalised words of a shown command (the module docstring's rule)."""
    text = " ".join(shown.replace("\\|", "|").split())
    text = re.sub(r"(^|\s)#(\s.*)?$", "", text)  # a trailing comment
    while (optional := re.sub(r"\[[^\[\]]*\]", " ", text)) != text:  # innermost [...] first
        text = optional
    words = []
    for word in shlex.split(text):
        if word in ("…", "..."):
            continue
        alternatives = re.fullmatch(r"\{([^{},]+),[^{}]*\}", word)
        word = alternatives.group(1) if alternatives else word.split("|")[0] if "|" in word else word
        words.append(NUMBER_PLACEHOLDERS.get(word, word))
    return words


def kaleido_args(words: list[str]) -> list[str]:
    """The arguments ``kaleido`` gets: after ``kaleido`` or after ``torchrun … -m kaleido_bert.cli``."""
    if words[0] == "torchrun":
        at = words.index("kaleido_bert.cli")
        assert words[at - 1] == "-m", words
        args = words[at + 1:]
    else:
        args = words[1:]
    if len(args) > 1 and args[0] == "patches" and args[1] not in (*PATCH_COMMANDS, "-h", "--help"):
        args.insert(1, "extract")  # cli.main's default action: `kaleido patches CATALOGUE --out STORE`
    return args


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser`` (argparse keeps them on the subparsers action; no public accessor)."""
    for action in parser._actions:
        if isinstance(action.choices, dict):
            return action.choices
    return {}


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    children = subcommands(parser)
    if not children:
        return {path}
    return set().union(*(leaf_commands(child, (*path, name)) for name, child in children.items()))


def walk(args: list[str]) -> tuple[argparse.ArgumentParser, tuple[str, ...], list[str]]:
    """The parser of the (sub)command ``args`` names, its path, and the arguments after it."""
    parser, path, rest = build_parser(), (), list(args)
    while rest and rest[0] in subcommands(parser):
        parser, path = subcommands(parser)[rest[0]], (*path, rest[0])
        rest.pop(0)
    return parser, path, rest


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@pytest.fixture
def run_paths(tmp_path, monkeypatch):
    """A working directory holding the run paths the docs name (the parser refuses a RUN that does not exist)."""
    for run in RUN_PATHS:
        (tmp_path / run).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(args: list[str]) -> argparse.Namespace:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args(args)
        except SystemExit:
            lines = stderr.getvalue().strip().splitlines()
            raise AssertionError(lines[-1] if lines else "argparse exited") from None


# ---------------------------------------------------------------------------------------------- commands
def test_the_docs_show_commands_of_every_kind():
    assert len(FULL) >= 40 and len(LIGHT) >= 10 and BENCH and MAKE
    assert {s.file for s in FULL} >= {"README.md", "docs/cli.md", "docs/real-catalogues.md", "docs/serving.md"}


@pytest.mark.parametrize("shown", FULL, ids=str)
def test_every_shown_command_parses_with_the_real_parser(shown, run_paths):
    if shown.text in SKIPPED:
        pytest.skip(SKIPPED[shown.text])
    args = kaleido_args(words_of(shown.text))
    try:
        namespace = parse(args)
    except (AssertionError, KaleidoError) as err:
        pytest.fail(f"{shown}\n  parsed as: kaleido {shlex.join(args)}\n  error: {err}")
    assert callable(getattr(namespace, "func", None)), f"{shown}: names no command that runs"
    parser, path, rest = walk(args)  # argparse accepts a prefix of an option; the docs spell options out
    inexact = [w.split("=")[0] for w in rest if w.startswith("--") and w.split("=")[0] not in option_names(parser)]
    assert not inexact, f"{shown}: kaleido {' '.join(path)} has no option {inexact} (only a longer one)"


def test_skipped_commands_are_still_shown():
    texts = {s.text for s in SHOWN}
    assert not set(SKIPPED) - texts, f"skipped commands no longer shown: {sorted(set(SKIPPED) - texts)}"


@pytest.mark.parametrize("shown", LIGHT, ids=str)
def test_every_inline_command_names_a_real_subcommand_and_its_options(shown):
    parser, path, rest = walk(kaleido_args(words_of(shown.text)))
    assert path or all(w.startswith("-") for w in rest), f"{shown}: {rest[0]!r} is not a kaleido command"
    unknown = [w.split("=")[0] for w in rest if w.startswith("-") and w.split("=")[0] not in option_names(parser)]
    assert not unknown, f"{shown}: kaleido {' '.join(path)} has no option {unknown}"


def test_every_subcommand_is_on_the_cli_page():
    shown = {walk(kaleido_args(words_of(s.text)))[1] for s in FULL if s.file == "docs/cli.md"}
    missing = sorted(" ".join(p) for p in leaf_commands(build_parser()) - shown)
    assert not missing, f"docs/cli.md shows no `kaleido {missing[0]} …` (missing: {missing})"


def declared_options(script: Path) -> set[str]:
    """The option strings of every ``add_argument`` call in ``script``."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return options


@pytest.mark.parametrize("shown", BENCH, ids=str)
def test_every_benchmark_command_names_a_script_and_its_options(shown):
    words = words_of(shown.text)
    script = ROOT / words[1]
    assert script.is_file(), f"{shown}: no script {words[1]}"
    unknown = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
    unknown = [w for w in unknown if w not in declared_options(script)]
    assert not unknown, f"{shown}: {words[1]} declares no {unknown}"


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("shown", MAKE, ids=str)
def test_every_make_command_names_a_target(shown):
    targets = words_of(shown.text)[1:]
    assert targets and set(targets) <= make_targets(), f"{shown}: the Makefile has {sorted(make_targets())}"


def test_every_shell_line_is_a_command_the_tests_check():
    """A shell line the rules above do not cover would be untested: there are none (or they are SKIPPED)."""
    checked = {(s.file, s.line) for s in FULL + BENCH + MAKE} | {(s.file, s.line) for s in SHOWN if s.text in SKIPPED}
    unchecked = [str(s) for s in SHOWN if s.kind == "block" and (s.file, s.line) not in checked]
    assert not unchecked, f"shell lines no rule checks: {unchecked}"


def test_the_rules_read_placeholders_alternatives_and_options():
    """The normalisation itself, on the forms the docs use."""
    assert words_of("kaleido data views DIR --max-side N\\|auto") == ["kaleido", "data", "views", "DIR", "--max-side", "2"]
    assert words_of("kaleido finetune {category,subcategory} --init RUN/pretrain [--image-only]  # a comment") == [
        "kaleido", "finetune", "category", "--init", "RUN/pretrain"]
    assert words_of('kaleido classify RUN --labels a,b [--template "a photo of {}"] [--json]') == [
        "kaleido", "classify", "RUN", "--labels", "a,b"]
    assert kaleido_args(words_of("torchrun --nproc_per_node N [--nnodes M …] -m kaleido_bert.cli patches CAT")) == [
        "patches", "extract", "CAT"]
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-option"):
        parse(["data", "check", "DIR", "--no-such-option"])
    assert walk(["demo", "--catalog", "CAT"])[2] == ["--catalog", "CAT"]  # a prefix the exact-option check refuses
    assert "--catalog" not in option_names(walk(["demo"])[0])


# ---------------------------------------------------------------------------------------------- documents
@pytest.mark.parametrize("doc", DOCUMENTS, ids=name_of)
def test_no_reference_to_documents_outside_the_repository(doc):
    text = doc.read_text()
    for pattern in (r"\.\./shared", r"/work/", r"\bSPEC\b", r"(?i)\bissues?\b", r"(?<![\w/&])#\d+\b"):
        hit = re.search(pattern, text)
        assert hit is None, f"{name_of(doc)}:{text.count(chr(10), 0, hit.start()) + 1}: {hit.group(0)!r}"


def test_the_readme_is_at_most_150_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces → hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = prose_and_blocks(path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", prose, flags=re.M)}


@pytest.mark.parametrize("doc", DOCUMENTS, ids=name_of)
def test_relative_links_point_to_files_and_headings_that_exist(doc):
    prose, _ = prose_and_blocks(doc.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links, f"{name_of(doc)} links to nothing"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{name_of(doc)}: link {link} → {path} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{name_of(doc)}: no heading #{anchor} in {path.name}: {sorted(anchors(path))}"


def test_every_picture_in_docs_is_shown():
    shown = " ".join(doc.read_text() for doc in DOCUMENTS)
    unshown = [p.name for p in sorted((ROOT / "docs").glob("*.png")) if f"{p.name})" not in shown]
    assert not unshown, f"pictures in docs/ no page shows: {unshown}"


def repo_path(token: str) -> tuple[Path, str] | None:
    """(base directory, glob) of a backticked repository path: repo-rooted, package-relative or a test file."""
    if re.search(r"[\s=<>{}]", token):
        return None
    first = token.split("/")[0]
    if "/" in token and first in ("benchmarks", "src", "tests", "docs", ".ci"):
        return ROOT, token.rstrip("/")
    if "/" in token and first and (PACKAGE / first).is_dir():
        return PACKAGE, token.rstrip("/")
    if re.fullmatch(r"test_\w+\.py", token):
        return ROOT / "tests", token
    return None


@pytest.mark.parametrize("doc", DOCUMENTS, ids=name_of)
def test_backticked_repository_paths_exist(doc):
    prose, _ = prose_and_blocks(doc.read_text())
    paths = [(span, repo_path(span)) for span in re.findall(r"`([^`\n]+)`", prose)]
    missing = [span for span, found in paths if found is not None and not any(found[0].glob(found[1]))]
    assert not missing, f"{name_of(doc)} names paths that do not exist: {missing}"


def section(text: str, heading: str) -> str:
    """The part of ``text`` from the heading line starting with ``heading`` to the next ``##`` heading."""
    start = re.search(rf"^{re.escape(heading)}.*$", text, flags=re.M).start()
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def numbers(cell: str) -> list[str]:
    return re.findall(r"[+-]?\d+(?:\.\d+)?", cell.replace("−", "-"))


@pytest.mark.parametrize("doc", sorted(RESULT_TABLES), ids=str)
def test_results_tables_show_the_numbers_of_their_result_file(doc):
    heading, source = RESULT_TABLES[doc]
    text = section((ROOT / doc).read_text(), heading)
    assert source.split("/")[-1] in text, f"{doc}: the results section does not cite {source}"
    result = (ROOT / source).read_text().replace("−", "-")
    rows = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
    assert len(rows) >= 7, f"{doc}: expected the results table, found {len(rows)} rows"
    for row in rows:
        for number in (n for cell in table_cells(row)[1:] for n in numbers(cell)):
            found = re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", result)
            assert found, f"{doc}: {number} in row {table_cells(row)[0]!r} is not in {source}"


# ---------------------------------------------------------------------------------------------- facts
def test_the_presets_table_matches_the_presets():
    rows = {cells[0].strip("`"): cells for line in section((ROOT / "docs/cli.md").read_text(), "### Presets")
            .splitlines() if line.startswith("| `") for cells in [table_cells(line)]}
    assert set(rows) == set(PRESET_NAMES), f"presets table rows {sorted(rows)} vs presets {PRESET_NAMES}"
    for name in PRESET_NAMES:
        config, (_, encoder, features, _use) = load_config(name), rows[name]
        assert f"{config.model.num_layers} layers" in encoder and f"H={config.model.hidden_size}" in encoder, name
        backbone = BACKBONE_NAMES.get(config.features.backbone)
        assert backbone, f"preset {name}: add backbone {config.features.backbone!r} to BACKBONE_NAMES"
        assert backbone in features, f"preset {name} uses {backbone}; the table says {features!r}"


def test_the_package_layout_names_every_module():
    table = section((ROOT / "docs/method.md").read_text(), "## Package layout (paper sections → modules)")
    rows = [table_cells(line) for line in table.splitlines() if line.startswith("| ")]
    missing = []
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name == "__init__.py":
            continue
        parts = module.relative_to(PACKAGE).parts
        if len(parts) == 1:  # a top-level module: anywhere in the table
            named = any(f"`{module.stem}`" in " ".join(r) or f"`{module.name}`" in " ".join(r) for r in rows)
        else:  # a sub-package's module: in its package's row
            named = any(f"`{parts[0]}/`" in r[0] and f"`{module.stem}`" in r[-1] for r in rows)
        if not named:
            missing.append(module.relative_to(PACKAGE).as_posix())
    assert not missing, f"docs/method.md's package layout does not name: {missing}"
