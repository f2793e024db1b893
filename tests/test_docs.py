"""The documentation runs: every ```python block and every command of every ```sh block in README.md and
docs/*.md is executed, so an example that drifts from the code fails here.

How a block is run, and shrunk, is written beside it in the Markdown, in an HTML comment just before the fence
(invisible where the Markdown is rendered):

- ``<!-- docs-test: replace `OLD` `NEW`; replace ... -->``: run with each ``OLD`` replaced by ``NEW`` (fewer epochs,
  a smaller data set); each ``OLD`` must occur in the block, so a shrink cannot silently stop applying;
- ``<!-- docs-test: setup`` followed by Python lines and ``-->``: run before the block, in its namespace (tensors
  the text calls ``x``, ``y``);
- ``<!-- docs-test: skip: REASON -->``: not run (a GPU, several machines), reported as a skipped test with REASON;
- ``<!-- docs-test: files-in FOLDER -->`` before a table: once the file's examples have run, every name in
  backticks in the table's first column exists in ``FOLDER`` (what the text says a command wrote).

Every fence has a language: ``python`` and ``sh`` run, ``text`` is a synopsis (not run; its commands and flags are
checked against the parser, as are ``pyro-bc ...`` spans in the prose). The Python blocks of one file share a
namespace, in order; all files share one working folder, README.md first (its quick start makes ``runs/demo``,
which docs/PYTHON.md reads). ``pyro-bc`` commands run in process (``pyro_bc.cli.main``), ``python`` ones as
subprocesses; ``$SMALL_MNIST`` is a folder of the first 6,000 training and 1,000 test images of the embedded MNIST.
Also checked: every ``pyro_bc.*`` name the docs give resolves, and every repository file they name exists.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import pytest

from pyro_bc.cli import build_parser, main
from pyro_bc.data.datasets import DEFAULT_DATA_DIR
from pyro_bc.data.idx import write_idx
from pyro_bc.data.mnist import MNIST_FILES, read_mnist
from pyro_bc.infer import reparam

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
OPEN = "<!-- docs-test:"
#: names the docs mention on purpose although they no longer exist
FORMER_NAMES = {"pyro_bc.inspect": "the former name of pyro_bc.report.datatree, given as such"}


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    markers: list[str]  # the docs-test comments just before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def skip_reason(self) -> str | None:
        reasons = [" ".join(m[len("skip:"):].split()) for m in self.markers if m.startswith("skip:")]
        return reasons[0] if reasons else None

    def setup(self) -> str:
        return "\n".join(m[len("setup"):] for m in self.markers if m.startswith("setup"))

    def shrunk(self) -> str:
        """The code with the markers' replacements applied (each must occur)."""
        code = self.code
        for old, new in re.findall(r"replace `([^`]*)` `([^`]*)`", "\n".join(self.markers)):
            assert old in code, f"{self.where}: the docs-test replacement {old!r} no longer occurs in the block"
            code = code.replace(old, new)
        return code


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        before, markers = text[:m.start()].rstrip(), []
        while before.endswith("-->") and OPEN in before and "-->" not in before[before.rfind(OPEN):-3]:
            start = before.rfind(OPEN)
            markers.insert(0, before[start + len(OPEN):-3].strip())
            before = before[:start].rstrip()
        found.append(Block(path, text[:m.start()].count("\n") + 1, m[1], m[2], markers))
    return found


ALL = [b for path in DOCS for b in blocks(path)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The shared working folder, with ``$SMALL_MNIST`` written."""
    d = tmp_path_factory.mktemp("docs")
    small = d / "small_mnist"
    small.mkdir()
    raw = read_mnist(DEFAULT_DATA_DIR)
    for key, array in (("train_images", raw.train_x[:6000]), ("train_labels", raw.train_y[:6000]),
                       ("test_images", raw.test_x[:1000]), ("test_labels", raw.test_y[:1000])):
        write_idx(small / MNIST_FILES[key], array.reshape(len(array), *array.shape[-2:]) if "images" in key else array)
    return d


def _commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def _run_command(line: str, where: str) -> None:
    argv = [os.path.expandvars(a) for a in shlex.split(line, comments=True)]
    head = argv[0].removeprefix(".venv/bin/")
    if head == "pyro-bc":
        try:
            status = main(argv[1:])
        except SystemExit as e:
            status = e.code
        assert status == 0, f"{where}: `{line}` exited {status}"
    elif head == "python":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, f"{where}: `{line}` exited {done.returncode}: {done.stderr[-2000:]}"
    else:
        raise AssertionError(f"{where}: no way to run `{head}` here: shrink it (replace) or skip it with a reason")


def test_every_example_runs(workdir, monkeypatch):
    """All files in order, one working folder: README.md's quick start makes runs/demo for docs/PYTHON.md."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SMALL_MNIST", str(workdir / "small_mnist"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(REPO))  # `import models` as from the repository root
    ops = dict(reparam.OPS)  # docs/PYTHON.md registers a layer kind: the other tests see the table as it was
    ran = 0
    try:
        for path in DOCS:
            pyro.clear_param_store()
            namespace = {"__name__": "__docs__"}
            for block in blocks(path):
                if block.lang not in ("python", "sh") or block.skip_reason() is not None:
                    continue
                code = block.shrunk()
                if block.lang == "python":
                    exec(compile(block.setup() + "\n" + code, block.where, "exec"), namespace)  # noqa: S102
                else:
                    for line in _commands(code):
                        _run_command(line, block.where)
                ran += 1
            for folder, table in re.findall(r"<!-- docs-test: files-in (\S+) -->\n((?:\|.*\n)+)", path.read_text()):
                names = [n for row in table.splitlines()[2:] for n in re.findall(r"`([^`]+)`", row.split("|")[1])]
                missing = [n for n in names if not (workdir / folder / n).exists()]
                assert names and not missing, f"{path.name}: {missing} not in {folder} after its examples ran"
    finally:
        reparam.OPS.clear()
        reparam.OPS.update(ops)
        pyro.clear_param_store()
    assert ran >= 12


def test_every_fence_says_what_it_is():
    untagged = [b.where for b in ALL if b.lang not in ("python", "sh", "text")]
    assert not untagged, f"fences without python, sh or text: {untagged}"


@pytest.mark.parametrize("block", [b for b in ALL if b.skip_reason() is not None], ids=lambda b: b.where)
def test_blocks_that_cannot_run_here_say_why(block):
    reason = block.skip_reason()
    assert len(reason) > 20, f"{block.where}: skipped without a real reason"
    pytest.skip(f"{block.where}: {reason}")


def _pyro_bc_spans() -> list[tuple[str, str]]:
    """(where, text) of every ``pyro-bc COMMAND ...`` in a text or sh block or an inline code span."""
    spans = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"`([^`\n]+)`", FENCE.sub("", text)):
            spans.append((str(path.relative_to(REPO)), m[1]))
        for b in blocks(path):
            if b.lang in ("text", "sh"):
                spans += [(b.where, line) for line in _commands(b.code)]
    return [(w, s) for w, s in spans if re.match(r"(\.venv/bin/)?pyro-bc [a-z]+( |$)", s.strip())]


def test_every_command_and_flag_the_docs_name_exists():
    commands = build_parser().commands
    wrong = []
    for where, span in _pyro_bc_spans():
        words = span.split()
        command = words[1]
        if command not in commands:
            wrong.append(f"{where}: unknown command in `{span}`")
            continue
        options = {o for action in commands[command]._actions for o in action.option_strings}
        wrong += [f"{where}: {command} has no {flag} (`{span}`)"
                  for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span) if flag not in options]
    assert not wrong, "\n".join(wrong)


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_pyro_bc_name_the_docs_give_exists():
    short = {"reparam": "infer.reparam", "graph": "compression.graph", "codec": "bcz.codec", "fused": "infer.fused",
             "posterior": "compression.posterior", "datatree": "report.datatree", "thresholds": "compression.thresholds"}
    names = set()
    for path in DOCS:
        for span in re.findall(r"`([^`\n]+)`", path.read_text()):
            name = span.split("(")[0].strip()
            if name.rsplit(".", 1)[-1] in ("nc", "npz", "json", "jsonl", "md", "py", "pt", "bcz", "png"):
                continue  # a file name, not a Python one
            if re.fullmatch(r"pyro_bc(\.\w+)+", name):
                names.add(name)
            elif re.fullmatch(rf"({'|'.join(short)})\.\w+(\.\w+)*", name):
                module, rest = name.split(".", 1)
                names.add(f"pyro_bc.{short[module]}.{rest}")
    missing = sorted(n for n in names if n not in FORMER_NAMES and not _resolves(n))
    assert len(names) > 30 and not missing, missing


def test_every_repository_file_the_docs_name_exists():
    named = set()
    for path in DOCS:
        named |= set(re.findall(r"(?<![\w/.])((?:analysis|scripts|models|pyro_bc|tests|docs)/[\w./-]+\.(?:py|sh|md))",
                                path.read_text()))
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert len(named) > 10 and not missing, missing
