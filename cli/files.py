"""Files for the command-line tools: input read in checked chunks, outputs that appear only when
complete, checks that run before anything is loaded, and a progress display.

The rules every tool follows (decode.py today; any tool that reads lines and writes a file):
an input is never opened for writing; an output is written to ``.NAME.XXXXXXXX.partial``
beside it, fsynced and renamed into place when complete (``output_stream``); an output that is
an input however spelled, a missing or read-only directory, a directory given as a file are
refused before the first byte (``check_output``, ``check_readable``); invalid UTF-8 is one line
naming the file and line (``read_chunks``, ``count_lines``).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from cli import UsageError
from data import DataError

log = logging.getLogger("decode")


def read_chunks(path: str, chunk_lines: int) -> Iterator[list[str]]:
    """Lines of ``path`` (or stdin) in chunks; invalid UTF-8 is an error naming file and line."""
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    name = "<stdin>" if path == "-" else path
    chunk, number = [], 0
    try:
        for number, raw in enumerate(stream, start=1):  # noqa: B007
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{name}:{number}: invalid UTF-8 at byte {err.start} ({raw[:60]!r}); "
                    "expected UTF-8 text"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            chunk.append(line.rstrip("\r\n"))
            if len(chunk) == chunk_lines:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def count_lines(path: str) -> int:
    """The number of lines ``read_chunks`` gives for a regular file (a last line without a
    newline counts), checked as UTF-8 on the way: invalid UTF-8 is ``read_chunks``' error,
    naming the file and line, before anything is loaded or written."""
    lines, last = 0, b"\n"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as stream:
            while block := stream.read(1 << 20):
                decoder.decode(block)
                lines += block.count(b"\n")
                last = block[-1:]
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        # Found; read_chunks names the line (a newline never sits inside a UTF-8 sequence, so
        # the line-by-line decode fails too).
        for _ in read_chunks(path, 4096):
            pass
        raise DataError(f"{path}: invalid UTF-8; expected UTF-8 text") from None
    return lines + (last != b"\n")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings name one file: the same device and inode when both exist (a
    symlink or a hard link), the same resolved path otherwise."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_readable(flag: str, path: str, what: str) -> None:
    """Refuses a ``flag`` path that is missing, a directory or unreadable (``-``: stdin)."""
    if path == "-":
        return
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{flag}={path}: no such file; expected {what}")
    if os.path.isdir(path):
        raise UsageError(f"{flag}={path} is a directory; expected {what}")
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            open(path, "rb").close()
        elif not os.access(path, os.R_OK):  # a pipe is not opened twice: it would lose data
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise UsageError(
            f"{flag}={path} cannot be read ({err.strerror}); expected {what}"
        ) from None


def check_output(path: str, sources: dict[str, str | None]) -> None:
    """Refuses an output that is a directory, lies in a missing or read-only directory, is a
    read-only file, or is one of ``sources`` (``{flag: path}``) however spelled."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise UsageError(f"--output={path} is a directory; expected a file name (or -)")
    real = Path(os.path.realpath(path))
    if not real.parent.is_dir():
        raise UsageError(f"--output={path}: directory {real.parent} does not exist")
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output={path}: cannot create files in directory {real.parent}")
    if real.exists() and not os.access(real, os.W_OK):
        raise UsageError(f"--output={path} is read-only; make it writable or write elsewhere")
    for flag, other in sources.items():
        if other and other != "-" and same_file(path, other):
            raise UsageError(
                f"--output={path} is the same file as {flag}={other}: decoding would replace "
                "what it reads; write the output elsewhere"
            )


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_stream(dst: str) -> Iterator[TextIO]:
    """Where the translation goes; a file appears (or changes) only when the body completes.

    ``-`` is stdout, and a device or pipe (``/dev/null``) is written directly. A file is
    written to ``.NAME.XXXXXXXX.partial`` beside it (a symlink's target), flushed to disk and
    renamed over it when the body returns; if it raises (an error, Ctrl-C, SIGTERM), the
    partial file is removed and the old output is untouched. The new file keeps an existing
    output's permission bits; a new one gets the umask's (as ``open`` would).
    """
    if dst == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(os.path.realpath(dst))
    try:
        old = target.stat()
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        with open(target, "w", encoding="utf-8") as out:
            yield out
        return
    mode = stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~_umask()
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, mode)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class Progress:
    """Lines done: a tqdm bar on ``stream`` (lines done of the total, lines/s, time left) when
    it is a terminal, otherwise one log line per chunk."""

    def __init__(self, total: int | None, stream: TextIO | None = None):
        stream = sys.stderr if stream is None else stream
        self.total, self.bar = total, None
        if stream.isatty():
            from tqdm import tqdm

            try:  # a terminal that reports no size (some pseudo-terminals) gets 100 x 20
                sized = min(os.get_terminal_size(stream.fileno())) > 0
            except (OSError, ValueError, io.UnsupportedOperation):
                sized = False
            self.bar = tqdm(
                total=total, unit=" lines", file=stream, desc="translated",
                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
            )  # fmt: skip

    def update(self, lines: int, done: int) -> None:
        if self.bar is not None:
            self.bar.update(lines)
        elif self.total is not None:
            log.info("translated %d of %d lines", done, self.total)
        else:
            log.info("translated %d lines", done)

    @contextlib.contextmanager
    def active(self) -> Iterator[Progress]:
        """While the bar shows, log lines print above it instead of through it."""
        if self.bar is None:
            yield self
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm():
                yield self
        finally:
            self.bar.close()
