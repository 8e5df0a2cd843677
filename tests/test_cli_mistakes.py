"""Ordinary mistakes with the three CLIs (train.py, decode.py, convert.py), one table.

Each row runs the real command in a fresh process and checks what a user meets: the exit
status, exactly one line on stderr naming the problem (no traceback), and every file that
existed before (input, output, workdir) byte for byte unchanged, with no file added or removed.
Rows whose mistake can only be found after work has begun (bad UTF-8 far into a file) allow the
progress lines before the error but still check that nothing a user owns changed.

A row's arguments and set-up are functions of a ``Case``: its scratch directory (the current
directory of the command) and a trained tiny workdir copied into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO


@dataclasses.dataclass(frozen=True)
class Case:
    """The paths one row works with."""

    tmp: Path  # the command's current directory; every file under it is checked
    workdir: Path  # a trained tiny translation workdir (a copy, under tmp)
    corpus: Path  # the repository's tiny corpus (read-only input)


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One row: ``tool`` run with ``args(case)`` after ``setup(case)``."""

    id: str
    tool: str  # "train.py" | "decode.py" | "convert.py"
    args: Callable[[Case], list[str]]
    expect: str  # a regular expression the error line must match (re.search)
    setup: Callable[[Case], None] = lambda case: None
    code: int = 1
    one_line: bool = True  # False: progress lines may come first; the error is the last line
    env: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return self.id


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def dev_lines(case: Case, n: int) -> str:
    lines = (case.corpus / "dev.en").read_text(encoding="utf-8").splitlines()[:n]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# decode.py
# ---------------------------------------------------------------------------------------------
DECODE = [
    Mistake(
        "decode-no-workdir",
        "decode.py",
        lambda c: ["--input=in.en", "--output=out.es"],
        r"--workdir is required",
        setup=lambda c: write(c.tmp / "in.en", "God is love.\n"),
    ),
]

# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------
TRAIN = [
    Mistake(
        "train-no-workdir",
        "train.py",
        lambda c: [f"--config={REPO / 'configs' / 'tiny.py'}"],
        r"--config and --workdir are required",
    ),
]

# ---------------------------------------------------------------------------------------------
# convert.py
# ---------------------------------------------------------------------------------------------
CONVERT = [
    Mistake(
        "convert-unknown-kind",
        "convert.py",
        lambda c: [f"--input=workdir:{c.workdir}", "--output=onnx:out"],
        r"onnx",
    ),
]

ROWS = DECODE + TRAIN + CONVERT


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (directories as ``DIR/``)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink() or not path.is_dir():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "?"
        else:
            found[rel + "/"] = "dir"
    return found


def run_tool(tool: str, args: list[str], cwd: Path, env: dict | None = None, timeout=300):
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / tool), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def case(tiny_workdir, tiny_corpus, tmp_path) -> Case:
    workdir = tmp_path / "W"
    shutil.copytree(tiny_workdir, workdir)
    return Case(tmp=tmp_path, workdir=workdir, corpus=tiny_corpus)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_a_mistake_is_one_line_and_nothing_is_lost(row: Mistake, case: Case):
    row.setup(case)
    before = snapshot(case.tmp)
    result = run_tool(row.tool, row.args(case), case.tmp, row.env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == row.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines, "no error line on stderr"
    if row.one_line:
        assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(row.expect, lines[-1]), lines[-1]
    assert snapshot(case.tmp) == before
