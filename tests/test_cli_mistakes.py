"""Ordinary mistakes with the three CLIs (train.py, decode.py, convert.py), one table.

Each row runs the real command in a fresh process and checks what a user meets: the exit
status, exactly one line on stderr naming the problem (no traceback), and every file that
existed before (input, output, workdir) byte for byte unchanged, with no file added or removed.
Rows whose mistake can only be found after work has begun (bad UTF-8 far into a file) allow the
progress lines before the error but still check that nothing a user owns changed.

A row's arguments and set-up are functions of a ``Case``: its scratch directory (the current
directory of the command) and a trained tiny workdir copied into it. A set-up may return a
function that undoes it (stops a process it started), called once the row has run.

Rows about permissions (``unprivileged``) run the command without root's power to write where
the permission bits forbid it: tests run as root in CI, where ``chmod`` stops nobody. Root's
command then runs without CAP_DAC_OVERRIDE and its kin (``DROP_ROOT_POWERS_AND_EXEC``), so
that a 0o555 directory is read-only for it too, while the files it owns (the repository, the
scratch directory) stay readable. (Running as ``nobody`` instead would not do: CI's clone lies
in a private ``mktemp -d`` directory that nobody may enter.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import FAST_FLAGS


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
    setup: Callable[[Case], Callable[[], None] | None] = lambda case: None  # returns an undo
    code: int = 1
    one_line: bool = True  # False: progress lines may come first; the error is the last line
    env: dict = dataclasses.field(default_factory=dict)
    unprivileged: bool = False  # True: permission bits bind the command, even run by root

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
TINY = f"--config={REPO / 'configs' / 'tiny.py'}"


def read_only(path: Path) -> Callable[[], None]:
    """Makes the directory ``path`` read-only (0o555); returns what restores its mode."""
    path.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode
    path.chmod(0o555)
    return lambda: path.chmod(mode)


def tokenizer_left_by_a_failed_start(case: Case) -> None:
    """What a first start refused after training its tokenizer used to leave behind."""
    write(case.tmp / "failed" / "tokenizer.model", (case.workdir / "tokenizer.model").read_bytes())


def hold_the_lock(workdir: Path) -> Callable[[], None]:
    """Starts a process that holds ``workdir``'s lock, as a training run does; returns what
    stops it."""
    code = (
        "import sys, time; from training import workdir_lock; "
        f"lock = workdir_lock.acquire({str(workdir)!r}); print('held', flush=True); "
        "time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"

    def stop():
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)

    return stop


TRAIN = [
    Mistake(
        "train-no-workdir",
        "train.py",
        lambda c: [TINY],
        r"--config and --workdir are required",
    ),
    Mistake(
        "train-missing-config-file",
        "train.py",
        lambda c: ["--config=configs/nope.py", "--workdir=new", "--config.num_train_steps=3"],
        r"--config=configs/nope.py: no such file; expected a config file .*configs/common.py",
    ),
    Mistake(
        "train-unknown-field",
        "train.py",
        lambda c: [TINY, "--workdir=new", "--config.flux_capacitor=1"],
        r"--config.flux_capacitor: the config has no field 'flux_capacitor'",
    ),
    Mistake(
        "train-misspelt-field",
        "train.py",
        lambda c: [TINY, "--workdir=new", "--config.num_train_step=3"],
        r"no field 'num_train_step'; did you mean 'num_train_steps'\?",
    ),
    Mistake(
        "train-workdir-is-a-file",
        "train.py",
        lambda c: [TINY, "--workdir=notes.txt"],
        r"--workdir=notes.txt is a file; expected a directory",
        setup=lambda c: write(c.tmp / "notes.txt", "my notes\n"),
    ),
    Mistake(
        "train-negative-steps",
        "train.py",
        lambda c: [TINY, "--workdir=new", "--config.num_train_steps=-5"],
        r"config.num_train_steps=-5 must be an integer >= 1",
    ),
    Mistake(  # a first start: the workdir must not even be created
        "train-bad-model-override",
        "train.py",
        lambda c: [TINY, "--workdir=new", "--config.model.overrides.activation=tanh"],
        r"config.model .*activation must be 'relu', 'swish' or 'gelu', got 'tanh'",
    ),
    Mistake(
        "train-tokenizer-of-another-size-in-a-trained-workdir",
        "train.py",
        lambda c: [TINY, f"--workdir={c.workdir}", "--config.vocab_size=300"],
        r"tokenizer.model was trained with vocab_size=500, but config.vocab_size=300.*"
        r"--config.vocab_size=500",
    ),
    Mistake(
        "train-tokenizer-of-another-size-left-by-a-failed-start",
        "train.py",
        lambda c: [TINY, "--workdir=failed", "--config.vocab_size=300"],
        r"failed/tokenizer.model was trained with vocab_size=500, but config.vocab_size=300: "
        r".*new --workdir, delete failed/tokenizer.model",
        setup=tokenizer_left_by_a_failed_start,
    ),
    Mistake(
        "train-read-only-parent-of-a-new-workdir",
        "train.py",
        lambda c: [TINY, "--workdir=locked_up/new"],
        r"cannot create --workdir=locked_up/new: .*locked_up is not writable",
        setup=lambda c: read_only(c.tmp / "locked_up"),
        unprivileged=True,
    ),
    Mistake(
        "train-read-only-workdir-to-resume",
        "train.py",
        lambda c: [TINY, f"--workdir={c.workdir}"],
        r"--workdir=.*/W is not writable",
        setup=lambda c: read_only(c.workdir),
        unprivileged=True,
    ),
    Mistake(  # the shape the workdir was trained with: a resume that passes every check
        "train-workdir-in-use",
        "train.py",
        lambda c: [TINY, f"--workdir={c.workdir}", *FAST_FLAGS],
        r"--workdir=.*/W is in use: .*/W/.lock is held by PID \d+ on host \S+",
        setup=lambda c: hold_the_lock(c.workdir),
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


def run_tool(
    tool: str, args: list[str], cwd: Path, env: dict | None = None, timeout=300,
    unprivileged: bool = False,
):  # fmt: skip
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    command = [sys.executable, str(REPO / tool), *args]
    if unprivileged and os.geteuid() == 0:
        command = [sys.executable, "-c", DROP_ROOT_POWERS_AND_EXEC, *command]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


# Run as ``python -c THIS PROGRAM ARGS...``: leaves the capabilities that let root write, read
# and chmod regardless of permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER:
# linux/capability.h) out of the bounding set (PR_CAPBSET_DROP = 24: linux/prctl.h), then runs
# PROGRAM, which so has not got them. A process of its own rather than a preexec_fn: forking
# the multithreaded test process and running Python before exec can deadlock.
DROP_ROOT_POWERS_AND_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2, 3):
    if libc.prctl(24, cap, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.fixture
def case(tiny_workdir, tiny_corpus, tmp_path) -> Case:
    workdir = tmp_path / "W"
    shutil.copytree(tiny_workdir, workdir)
    return Case(tmp=tmp_path, workdir=workdir, corpus=tiny_corpus)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_a_mistake_is_one_line_and_nothing_is_lost(row: Mistake, case: Case):
    undo = row.setup(case)
    try:
        before = snapshot(case.tmp)
        result = run_tool(
            row.tool, row.args(case), case.tmp, row.env, unprivileged=row.unprivileged
        )
    finally:
        if undo is not None:
            undo()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == row.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines, "no error line on stderr"
    if row.one_line:
        assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(row.expect, lines[-1]), lines[-1]
    assert snapshot(case.tmp) == before


def test_train_help_points_at_the_config_fields(tmp_path):
    result = run_tool("train.py", ["--help"], tmp_path)  # absl's --help exits with status 1
    assert "configs/common.py" in result.stdout, result.stdout[-3000:]
