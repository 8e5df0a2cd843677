"""The latest result of each benchmark, as a Markdown fragment in ``bench/results/<name>.md``.

Every benchmark that prints a result table also hands it to ``write_result``, which writes one
heading, the metadata a number needs to be judged (the machine's CPU and the flags that decide
its matmul speed, the commit, the date, the command line) and the table. ``docs/benchmarks.md``
links to these files instead of copying their numbers; the next run of a benchmark replaces its
file, and earlier results are kept by git (and, for the older ones, in ``bench/HISTORY.md``).

``AIAYN_BENCH_RESULTS=DIR`` writes them to DIR instead (the tests do, so that running a
benchmark in the suite never changes the repository's files).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from runtime.hardware import REPORTED_CPU_FLAGS, cpu_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ENV = "AIAYN_BENCH_RESULTS"


def results_dir() -> Path:
    """Where results go: ``$AIAYN_BENCH_RESULTS`` if set, else ``bench/results``."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else RESULTS


def machine() -> str:
    """The CPU's model name, its core count and which of the reported flags it has."""
    name, flags = cpu_info()
    present = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in REPORTED_CPU_FLAGS)
    return f"{name}, {os.cpu_count()} cores; {present}"


def commit(repo: Path = REPO) -> str:
    """The short hash of HEAD, with ``+dirty`` if a tracked file differs from it.

    As ``git describe --dirty``: untracked files do not count, nor do the result files
    themselves (a benchmark run after another would otherwise always be "dirty").
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout, or git is missing)"
    return head + ("+dirty" if changed else "")


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """``python -m bench.NAME ARGS``, quoted as a shell would need it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", f"bench.{name}", *map(shlex.quote, args)])


def write_result(
    name: str,
    table_markdown: str,
    *,
    argv: Sequence[str] | None,
    directory: str | Path | None = None,
) -> Path:
    """Writes the latest result of benchmark ``name`` to ``DIR/NAME.md``; returns the path.

    Args:
      name: the benchmark's module name in ``bench`` (``train_speed``, ...).
      table_markdown: the result: a Markdown table, with any lines that explain it.
      argv: the benchmark's arguments (after the program name); None: ``sys.argv[1:]``.
      directory: where to write; default ``results_dir()``.

    The file is written beside its destination under a temporary name, flushed to disk and
    renamed into place, so a reader sees the old result or the new one, never a part of one.
    """
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"benchmark name {name!r}: expected lower-case letters, digits and _")
    directory = Path(directory) if directory is not None else results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# `bench.{name}`: the latest result\n\n"
        f"- machine: {machine()}\n"
        f"- commit: {commit()}\n"
        f"- date: {date}\n"
        f"- command: `{command_line(name, argv)}`\n\n"
        f"{table_markdown.strip()}\n"
    )
    path = directory / f"{name}.md"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table of ``rows`` under ``header`` (cells as ``str()`` gives them)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
