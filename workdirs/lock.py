"""One process at a time in a workdir: an exclusive OS lock on ``WORKDIR/.lock``.

Two trainers in one workdir interleave their rows in ``metrics.jsonl``, delete each other's
checkpoints in progress and overwrite each other's ``config.json``. So whatever writes a workdir
holds this lock while it does: ``train.py`` (process 0 of a run, from right after its checks to
its end; the other processes of a multi-host run share process 0's workdir and its lock) and
``python -m training.average`` (while it writes ``WORKDIR/averaged``). A second one is refused
with one line naming the holder's PID and host.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``WORKDIR/.lock``, kept open for the life of
the holder. The kernel releases it when that file is closed, which happens however the process
ends, SIGKILL and power loss included: a killed run never leaves a stale lock, and the file
itself (never deleted, to keep locking race-free) means nothing once no one holds it. Its
content (PID, host, start time, command) is only there to name the holder. flock works between
hosts on NFS too (Linux takes a POSIX lock on the server for it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirLockError(RuntimeError):
    """The workdir is held by another process, or cannot be locked: one line, exit status 1."""


class WorkdirLock:
    """A held lock; ``release`` (or leaving the ``with`` block) gives it up."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(workdir: str | Path, command: str = "train.py") -> WorkdirLock:
    """Locks ``workdir`` (which must exist) for this process.

    Args:
      workdir: the directory to hold.
      command: what holds it, written into the lock file for the message others get.

    Raises:
      WorkdirLockError: another process holds it (naming its PID and host), or the lock file
        cannot be opened or locked.
    """
    path = Path(workdir) / LOCK_FILE
    try:
        # Opened without truncating: a process that is refused must not wipe the holder's note.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WorkdirLockError(f"cannot open the workdir lock {path}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(_read(fd))
        os.close(fd)
        raise WorkdirLockError(
            f"--workdir={workdir} is in use: {path} is held by {holder}; one process at a time "
            "may write a workdir: wait for that one to end, stop it, or use another --workdir"
        ) from None
    except OSError as err:
        os.close(fd)
        raise WorkdirLockError(f"cannot lock {path}: {err.strerror}") from None
    note = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    return WorkdirLock(fd, path)


def holder(workdir: str | Path) -> dict:
    """What the lock file of ``workdir`` says about its last holder (``{}`` if nothing)."""
    try:
        return _parse(Path(workdir, LOCK_FILE).read_bytes())
    except OSError:
        return {}


@contextlib.contextmanager
def hold_for_run(workdir: str | Path, command: str = "train.py") -> Iterator[WorkdirLock | None]:
    """Process 0 holds ``workdir`` for the ``with`` block; every process raises if it cannot.

    Multi-host runs share one workdir: process 0 locks it and tells the others whether it
    could, so they stop with it instead of waiting for it at their first collective.
    Creates ``workdir`` (and its parents) first.

    Yields:
      The lock on process 0, None on the others.
    """
    import jax

    Path(workdir).mkdir(parents=True, exist_ok=True)
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir, command)
        except WorkdirLockError as err:
            error = err
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        locked = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not locked and error is None:
            error = WorkdirLockError(
                f"process 0 could not lock --workdir={workdir} (see its log): stopping"
            )
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _read(fd: int) -> dict:
    try:
        return _parse(os.pread(fd, 4096, 0))
    except OSError:
        return {}


def _parse(content: bytes) -> dict:
    try:
        note = json.loads(content.decode("utf-8", errors="replace"))
    except ValueError:  # empty (the holder has not written it yet) or not ours
        return {}
    return note if isinstance(note, dict) else {}


def _describe(note: dict) -> str:
    if "pid" not in note:
        return "another process (it has not written its PID yet)"
    text = f"PID {note['pid']} on host {note.get('host', '?')}"
    if note.get("command"):
        text += f" ({note['command']}"
        text += f", since {note['started']})" if note.get("started") else ")"
    return text
