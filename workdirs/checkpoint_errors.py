"""What can go wrong reading a checkpoint, told apart, and what a checkpoint does not fit.

Three kinds of failure need three different answers (``workdirs.checkpoints`` acts on them):

- **damaged**: truncated or garbled files, a missing file or item (JSON that does not parse,
  TensorStore's DATA_LOSS / OUT_OF_RANGE / NOT_FOUND ...). The checkpoint is set aside and the
  previous one used.
- **transient**: an I/O error that may go away (EIO, EAGAIN, a timeout; TensorStore's
  UNAVAILABLE / DEADLINE_EXCEEDED). Retried with a growing delay, then a loud failure; nothing
  is moved.
- anything else is not recognised: a loud failure, nothing moved (guessing "damaged" would set
  aside a good checkpoint because of, say, a bug or a device problem).

A checkpoint that reads fine but whose parameter or optimizer tree differs from what the current
configuration builds is neither: ``tree_differences`` names the differences before any array
is read, and ``config_differences`` names the configuration fields that changed since it was
saved.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from typing import Any

import jax

DAMAGED = "damaged"
TRANSIENT = "transient"

_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.ENOLCK,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}
# TensorStore raises ValueError("CODE: ...") with an absl status code; EIO maps to UNAVAILABLE.
_TRANSIENT_CODES = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:", "RESOURCE_EXHAUSTED:")
_DAMAGED_CODES = ("DATA_LOSS:", "OUT_OF_RANGE:", "NOT_FOUND:", "FAILED_PRECONDITION:")


class CheckpointError(RuntimeError):
    """A checkpoint could not be used; the message says which, why, and what to do."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint does not fit the current configuration."""


class CheckpointReadError(CheckpointError):
    """A checkpoint could not be read for a reason that is not (known to be) damage."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; the ones written before are intact."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The error and the ones it was raised from (Orbax wraps TensorStore's)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def classify(err: BaseException) -> str | None:
    """``TRANSIENT``, ``DAMAGED`` or None (not recognised) for an error raised while reading."""
    chain = list(_chain(err))
    for e in chain:  # transient first: a flaky disk can also make a read look truncated
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return TRANSIENT
        if isinstance(e, TimeoutError) or str(e).startswith(_TRANSIENT_CODES):
            return TRANSIENT
    for e in chain:
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
            return DAMAGED
        if isinstance(e, ValueError) and str(e).startswith(_DAMAGED_CODES):
            return DAMAGED
        # Orbax: an item directory that is missing, or an array it could not read back.
        if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
            return DAMAGED
        if type(e) is Exception and str(e).startswith("Encountered error while reading array"):
            return DAMAGED
    return None


def describe(err: BaseException) -> str:
    """``Type: first line`` of an error, short enough for a log line."""
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'a/b/c': (shape, dtype)}`` for every array leaf (saved metadata or abstract arrays)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out[_path_name(path)] = (tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)))
    return out


def tree_differences(saved: Any, expected: Any, *, limit: int = 3) -> list[str]:
    """What differs between a saved tree's metadata and the tree the code expects.

    Args:
      saved: the checkpoint item's metadata tree (Orbax ``ArrayMetadata`` leaves).
      expected: the abstract tree (``jax.ShapeDtypeStruct`` leaves) it would be restored into.
      limit: examples named per kind of difference.

    Returns:
      Human-readable lines (empty when the trees agree): leaves only in the checkpoint, leaves
      only expected, and leaves whose shape or dtype differs.
    """
    if hasattr(saved, "tree"):  # Orbax's TreeMetadata wraps the tree
        saved = saved.tree
    have, want = _leaves(saved), _leaves(expected)
    lines = []

    def some(names):
        names = sorted(names)
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    if extra := set(have) - set(want):
        lines.append(f"{len(extra)} leaves saved but not expected ({some(extra)})")
    if missing := set(want) - set(have):
        lines.append(f"{len(missing)} leaves expected but not saved ({some(missing)})")
    changed = [k for k in set(have) & set(want) if have[k] != want[k]]
    if changed:
        k = sorted(changed)[0]
        lines.append(
            f"{len(changed)} leaves of another shape or dtype ({some(changed)}; e.g. {k}: "
            f"saved {have[k][0]} {have[k][1]}, expected {want[k][0]} {want[k][1]})"
        )
    return lines


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{'model.preset': 'tiny', ...}`` from a nested configuration dict."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict | None, current: dict) -> list[str]:
    """``field: saved -> now`` for every configuration field that differs (sorted)."""
    if not saved:
        return []
    old, new = flatten(saved), flatten(current)
    return [
        f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
