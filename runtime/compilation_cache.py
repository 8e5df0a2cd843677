"""JAX's persistent compilation cache, shared by train.py, decode.py and the benchmarks.

XLA programs compiled once are written to ``~/.cache/aiayn-jax/xla`` (or ``$AIAYN_XLA_CACHE``;
an empty value turns the cache off), so a second run of the same command with the same shapes
compiles nothing: ``decode.py`` spends its first minute compiling beam searches otherwise, and a
restarted ``train.py`` recompiles its step. JAX's own ``JAX_COMPILATION_CACHE_DIR`` wins when
set. Entries are keyed by the program, the JAX version and the device, so a stale one is never
used; deleting the directory is always safe.

``decode.py`` also keeps its traced searches (``decoding.exported``) in
``~/.cache/aiayn-jax/exported`` (or ``$AIAYN_EXPORT_CACHE``; empty turns it off), so a second
run does not even trace them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

DEFAULT_DIR = Path.home() / ".cache" / "aiayn-jax" / "xla"
EXPORTED_DIR = Path.home() / ".cache" / "aiayn-jax" / "exported"


def exported_dir() -> Path | None:
    """The directory of ``decode.py``'s traced searches: ``$AIAYN_EXPORT_CACHE`` or
    ``EXPORTED_DIR``; None when that variable is set but empty."""
    path = os.environ.get("AIAYN_EXPORT_CACHE", str(EXPORTED_DIR))
    return Path(path).expanduser() if path else None


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Turns on the persistent compilation cache (idempotent); returns its directory or None.

    Args:
      path: the cache directory; default ``$AIAYN_XLA_CACHE`` or ``DEFAULT_DIR``.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    if path is None:
        path = os.environ.get("AIAYN_XLA_CACHE", str(DEFAULT_DIR))
    if not path:
        return None
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # A read-only home must not stop a run; it only compiles more.
        log.warning("compilation cache disabled: cannot create %s (%s)", path, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program worth a lookup: decoding compiles many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
