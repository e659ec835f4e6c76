"""Every code block of the docs runs (issue 15, "kept true").

The ```python blocks of README.md and docs/**/*.md run, page by page, in order, in one namespace
per page (a later block may use what an earlier one defined), in a temporary working directory.
The ```bash blocks whose first command is `minisd` (or `.venv/bin/minisd`) run through
`minisd.cli.main`, in the same directory. Both use the shipped tiny model where they need one.

A block that cannot run here (it needs an official checkpoint, a dataset or a GPU) says so, visibly,
on the line before its fence:

    <!-- not run: needs an official checkpoint -->

Any other python or minisd block runs; a marker that is not followed by a fence fails, so the
markers cannot drift away from their blocks. Other bash blocks (installing, pytest, torchrun,
python -m ...) are instructions, not run.
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
OPT_OUT = re.compile(r"^<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^\s*```(?P<lang>[\w+-]*)\s*$")  # indented fences (in lists) count too
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
CLI = ("minisd", ".venv/bin/minisd")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the opt-out reason, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, each with the opt-out marker of the line before it."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: a code fence is never closed"
        opt = OPT_OUT.match(lines[i - 1].strip()) if i else None
        code = textwrap.dedent("\n".join(lines[i + 1 : end]) + "\n")
        found.append(Block(path, i + 1, m["lang"].lower(), code, opt["reason"] if opt else None))
        i = end + 1
    return found


def commands(code: str) -> list[list[str]]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def runs_cli(block: Block) -> bool:
    cmds = commands(block.code) if block.lang in SHELL else []
    return bool(cmds) and cmds[0][0] in CLI


def runnable(block: Block) -> bool:
    return block.not_run is None and (block.lang in PYTHON or runs_cli(block))


ALL = [b for p in pages() for b in blocks(p)]
PAGES = sorted({b.path for b in ALL if runnable(b)})


def test_the_docs_have_runnable_blocks():
    # The extraction itself: a walkthrough page per stage, each with a snippet that runs.
    walkthrough = [p for p in PAGES if p.parent.name == "walkthrough"]
    assert len(walkthrough) >= 9, [str(p) for p in walkthrough]
    assert sum(b.lang in PYTHON and runnable(b) for b in ALL) >= 10


def test_every_marker_sits_on_a_fence():
    for path in pages():
        lines = path.read_text().splitlines()
        for k, line in enumerate(lines):
            if OPT_OUT.match(line.strip()):
                nxt = lines[k + 1] if k + 1 < len(lines) else ""
                assert FENCE.match(nxt), f"{path.relative_to(ROOT)}:{k + 1}: 'not run' marker without a fence after it"
            elif line.strip().startswith("<!--") and "not run" in line:
                raise AssertionError(f"{path.relative_to(ROOT)}:{k + 1}: malformed marker {line.strip()!r}")


def test_shell_blocks_that_start_with_minisd_are_only_minisd():
    # A block is run as a whole or opted out as a whole: no shell commands mixed in.
    for b in ALL:
        if runs_cli(b):
            assert all(argv[0] in CLI for argv in commands(b.code)), f"{b.where}: mixed commands"


def _run_cli(block: Block) -> None:
    from minisd.cli import main

    for argv in commands(block.code):
        try:
            rc = main(argv[1:])
        except SystemExit as e:  # argparse's --help / usage errors
            rc = e.code
        assert rc in (0, None), f"{block.where}: `{shlex.join(argv)}` exited with {rc}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_snippet__"}
    for block in blocks(page):
        if not runnable(block):
            continue
        if block.lang in PYTHON:
            code = compile(block.code, block.where, "exec")
            exec(code, namespace)  # noqa: S102 - the docs' own code, which is what is tested
        else:
            _run_cli(block)
    assert os.getcwd() == str(tmp_path)
