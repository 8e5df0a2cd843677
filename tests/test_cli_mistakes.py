"""Ordinary mistakes with the three CLIs (train.py, decode.py, convert.py), one table.

Each row runs the real command in a fresh process and checks what a user meets: the exit
status, exactly one line on stderr naming the problem (no traceback), and every file that
existed before (input, output, workdir) byte for byte unchanged, with no file added or removed.
Rows whose mistake can only be found after work has begun (``one_line=False``) allow the
progress lines before the error but still check that nothing a user owns changed.

A row's arguments and set-up are functions of a ``Case``: its scratch directory (the current
directory of the command) and a trained tiny workdir copied into it (and, for rows that need
one, a masked LM's). A set-up may return a function that undoes it (stops a process it
started), called once the row has run.

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
from tests.test_workdir_lock import hold


@dataclasses.dataclass(frozen=True)
class Case:
    """The paths one row works with."""

    tmp: Path  # the command's current directory; every file under it is checked
    workdir: Path  # a trained tiny translation workdir (a copy, under tmp)
    corpus: Path  # the repository's tiny corpus (read-only input)
    mlm: Path  # a trained tiny masked-LM workdir (a copy, under tmp) for rows that need it


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One row: ``tool`` run with ``args(case)`` after ``setup(case)``."""

    id: str
    tool: str  # "train.py" | "decode.py" | "convert.py"
    args: Callable[[Case], list[str]]
    expect: str | Callable[[Case], str]  # a regular expression the error line must match
    setup: Callable[[Case], Callable[[], None] | None] = lambda case: None  # returns an undo
    code: int = 1
    one_line: bool = True  # False: progress lines may come first; the error is the last line
    env: dict = dataclasses.field(default_factory=dict)
    # "mlm": the masked-LM workdir is copied into the case; "checkpoints": the case workdir has
    # at least two training checkpoints (two_checkpoint_workdir)
    needs: tuple[str, ...] = ()
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
def workdir(case: Case) -> str:
    return f"--workdir={case.workdir}"


def text_in(case: Case, name: str = "x.en", n: int = 12) -> None:
    write(case.tmp / name, dev_lines(case, n))


def text_and_old_output(case: Case) -> None:
    """``x.en`` to translate and an existing output ``o.txt`` holding ``KEEP``."""
    text_in(case)
    write(case.tmp / "o.txt", "KEEP\n")


def late_bad_utf8(case: Case) -> None:
    lines = dev_lines(case, 40).encode().split(b"\n")
    lines[34] = b"broken \xff here"  # line 35: after three chunks of 10
    write(case.tmp / "bad.en", b"\n".join(lines))
    write(case.tmp / "o.txt", "KEEP\n")


def fake_matplotlib(case: Case) -> None:
    """A matplotlib that cannot be imported, ahead of the real one on PYTHONPATH=fake."""
    text_and_old_output(case)
    write(case.tmp / "fake" / "matplotlib" / "__init__.py", "raise ImportError('simulated')\n")


def steps(case: Case) -> list[int]:
    """The case workdir's training checkpoints, oldest first."""
    directory = case.workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def damage_newest_checkpoint(case: Case) -> None:
    """Truncates every file of the newest checkpoint's parameter arrays, as a full disk would."""
    assert len(steps(case)) >= 2, steps(case)  # rows with needs=("checkpoints",)
    for f in (case.workdir / "checkpoints" / str(steps(case)[-1]) / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    text_and_old_output(case)


def value(flag: str, bad: str, expect: str, *more: str) -> Mistake:
    """A row for one flag value out of range: refused before the model is loaded."""
    return Mistake(
        f"decode-{flag}={bad}",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", f"--{flag}={bad}", *more],
        expect,
        setup=text_and_old_output,
    )


DECODE = [
    Mistake(
        "decode-no-workdir",
        "decode.py",
        lambda c: ["--input=in.en", "--output=out.es"],
        r"--workdir is required",
        setup=lambda c: write(c.tmp / "in.en", "God is love.\n"),
    ),
    Mistake(
        "decode-output-is-the-input",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=x.en"],
        r"--output=x.en is the same file as --input=x.en: decoding would replace what it reads",
        setup=text_in,
    ),
    Mistake(
        "decode-output-is-the-input-via-a-symlink",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=link.en"],
        r"--output=link.en is the same file as --input=x.en",
        setup=lambda c: (text_in(c), (c.tmp / "link.en").symlink_to("x.en")),
    ),
    Mistake(
        "decode-output-is-the-input-spelt-./x.en",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=./x.en"],
        r"--output=./x.en is the same file as --input=x.en",
        setup=text_in,
    ),
    Mistake(
        "decode-output-is-the-input-via-a-hard-link",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=hard.en"],
        r"--output=hard.en is the same file as --input=x.en",
        setup=lambda c: (text_in(c), os.link(c.tmp / "x.en", c.tmp / "hard.en")),
    ),
    Mistake(
        "decode-output-is-the-reference",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--reference=ref.es", "--output=ref.es"],
        r"--output=ref.es is the same file as --reference=ref.es",
        setup=lambda c: (text_in(c), text_in(c, "ref.es")),
    ),
    Mistake(
        "decode-missing-input-keeps-the-old-output",
        "decode.py",
        lambda c: [workdir(c), "--input=missing.en", "--output=o.txt"],
        r"--input=missing.en: no such file; expected a text file",
        setup=lambda c: write(c.tmp / "o.txt", "KEEP\n"),
    ),
    Mistake(
        "decode-input-is-a-directory",
        "decode.py",
        lambda c: [workdir(c), "--input=D", "--output=o.txt"],
        r"--input=D is a directory; expected a text file",
        setup=lambda c: (write(c.tmp / "D" / "a.en", "God is love.\n"), text_and_old_output(c)),
    ),
    Mistake(
        # Found before the model loads (the input is read through once, counted and checked),
        # so the old output and no partial file are all that is there.
        "decode-invalid-utf8-late-in-the-input",
        "decode.py",
        lambda c: [workdir(c), "--input=bad.en", "--output=o.txt", "--chunk_lines=10"],
        r"bad.en:35: invalid UTF-8 at byte 7 .*expected UTF-8 text",
        setup=late_bad_utf8,
    ),
    Mistake(
        "decode-output-is-a-directory",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=D"],
        r"--output=D is a directory; expected a file name",
        setup=lambda c: (text_in(c), write(c.tmp / "D" / "keep.txt", "KEEP\n")),
    ),
    Mistake(
        "decode-output-in-a-missing-directory",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=nodir/o.txt"],
        r"--output=nodir/o.txt: directory \S*/nodir does not exist",
        setup=text_in,
    ),
    Mistake(
        "decode-missing-reference-before-translating",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", "--reference=missing.es"],
        r"--reference=missing.es: no such file; expected a text file, one reference per input",
        setup=text_and_old_output,
    ),
    Mistake(
        "decode-reference-is-a-directory",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", "--reference=D"],
        r"--reference=D is a directory",
        setup=lambda c: (text_and_old_output(c), (c.tmp / "D").mkdir()),
    ),
    Mistake(
        "decode-reference-of-another-length-before-translating",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", "--reference=ref.es"],
        r"--reference=ref.es has 5 lines but x.en has 12; expected one reference per input line",
        setup=lambda c: (text_and_old_output(c), text_in(c, "ref.es", 5)),
    ),
    value("alpha", "nan", r"--alpha=nan: .*must be a finite number within \[0, 10\]"),
    value("alpha", "1e9", r"--alpha=1e\+09: .*must be a finite number within \[0, 10\]"),
    value("alpha", "-1", r"--alpha=-1: .*must be a finite number within \[0, 10\]"),
    value("max_new_tokens", "0", r"--max_new_tokens=0: must be at least 1"),
    value("batch_tokens", "-1", r"--batch_tokens=-1: must be at least 0"),
    value("beam_size", "0", r"--beam_size=0: must be at least 1"),
    value("n_best", "5", r"--n_best=5: must be within \[1, --beam_size=4\]"),
    value("temperature", "0", r"--temperature=0: must be a finite number > 0", "--method=sample"),
    value("top_k", "-1", r"--top_k=-1: must be at least 0", "--method=sample"),
    value("top_p", "0", r"--top_p=0: must be within \(0, 1\]", "--method=sample"),
    value("top_p", "1.5", r"--top_p=1.5: must be within \(0, 1\]", "--method=sample"),
    value("chunk_lines", "0", r"--chunk_lines=0: must be at least 1"),
    Mistake(
        # Refused, not read from stdin while the file is ignored.
        "decode-positional-argument",
        "decode.py",
        lambda c: [workdir(c), "x.en"],
        r"unexpected argument 'x.en': every input is a flag \(for example --input=x.en\)",
        setup=text_in,
    ),
    Mistake(
        "decode-attention-plot-without-matplotlib",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", "--attention_plot=a.png"],
        r'--attention_plot needs matplotlib \(simulated\): pip install -e "\.\[plot\]"',
        setup=fake_matplotlib,
        env={"PYTHONPATH": "fake"},  # relative to the case directory, the command's cwd
    ),
    Mistake(
        "decode-attention-plot-to-stdout",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", "--attention_plot=-"],
        r"--attention_plot=-: the plots are PNG files; expected FILE.png",
        setup=text_and_old_output,
    ),
    Mistake(
        "decode-attention-plot-of-stdin",
        "decode.py",
        lambda c: [workdir(c), "--input=-", "--output=o.txt", "--attention_plot=a.png"],
        r"--attention_plot needs --input=FILE",
        setup=text_and_old_output,
    ),
    Mistake(
        "decode-checkpoint-that-does-not-exist",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", "--checkpoint=999"],
        lambda c: (
            rf"no checkpoint for step 999 in \S+; available steps: {re.escape(str(steps(c)))}"
        ),
        setup=text_and_old_output,
    ),
    Mistake(
        "decode-damaged-checkpoint-named-explicitly",
        "decode.py",
        lambda c: [workdir(c), "--input=x.en", "--output=o.txt", f"--checkpoint={steps(c)[-1]}"],
        lambda c: (
            rf"checkpoint checkpoints/{steps(c)[-1]} of \S+ is damaged \(.+\); nothing in "
            rf"the workdir was changed; the newest readable earlier checkpoint is step "
            rf"{steps(c)[-2]}: rerun with --checkpoint={steps(c)[-2]}$"
        ),
        setup=damage_newest_checkpoint,
        needs=("checkpoints",),
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
    holder = hold(workdir)

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
    Mistake(
        # Was: "the tokenizer has 500 pieces but the model's vocab_size is 501".
        "convert-masked-lm",
        "convert.py",
        lambda c: [f"--input=workdir:{c.mlm}", "--output=ctranslate2:out"],
        r"holds an encoder-only \(masked LM\) model: masked LMs cannot be exported to "
        r"--output=ctranslate2:",
        needs=("mlm",),
    ),
    Mistake(
        "convert-damaged-checkpoint-named-explicitly",
        "convert.py",
        lambda c: [
            f"--input=workdir:{c.workdir}",
            "--output=workdir:out",
            f"--checkpoint={steps(c)[-1]}",
        ],
        lambda c: (
            rf"checkpoint checkpoints/{steps(c)[-1]} of \S+ is damaged .*rerun with "
            rf"--checkpoint={steps(c)[-2]}$"
        ),
        setup=damage_newest_checkpoint,
        needs=("checkpoints",),
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


@pytest.fixture(scope="session")
def mlm_workdir(tmp_path_factory) -> Path:
    """A masked LM (configs/mlm_tiny.py) trained for 2 steps: enough to be a workdir."""
    import training.loop
    from configs.mlm_tiny import get_config
    from tests.test_train import QUIET

    path = tmp_path_factory.mktemp("mlm_workdir")
    config = get_config()
    config.update(dict(num_train_steps=2, checkpoint_every_steps=2, **QUIET))
    training.loop.train_and_evaluate(config, path)
    return path


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
    return Case(tmp=tmp_path, workdir=workdir, corpus=tiny_corpus, mlm=tmp_path / "MLM")


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_a_mistake_is_one_line_and_nothing_is_lost(row: Mistake, case: Case, request):
    if "mlm" in row.needs:
        shutil.copytree(request.getfixturevalue("mlm_workdir"), case.mlm)
    if "checkpoints" in row.needs:
        shutil.rmtree(case.workdir)
        shutil.copytree(request.getfixturevalue("two_checkpoint_workdir"), case.workdir)
    undo = row.setup(case)
    expect = row.expect(case) if callable(row.expect) else row.expect
    try:
        before = snapshot(case.tmp)
        result = run_tool(
            row.tool, row.args(case), case.tmp, row.env, unprivileged=row.unprivileged
        )
    finally:
        if callable(undo):  # decode rows' set-ups return what their writes return
            undo()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == row.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines, "no error line on stderr"
    if row.one_line:
        assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(expect, lines[-1]), lines[-1]
    assert snapshot(case.tmp) == before


def test_train_help_points_at_the_config_fields(tmp_path):
    result = run_tool("train.py", ["--help"], tmp_path)  # absl's --help exits with status 1
    assert "configs/common.py" in result.stdout, result.stdout[-3000:]
