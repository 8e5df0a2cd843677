"""Lets XLA's CPU runtime reuse its memory from one execution to the next instead of faulting in
fresh pages every time.

XLA on CPU allocates each execution's temporary buffer (405 MB for one train step of the probe
model in ``bench/train_speed.py``) with ``posix_memalign`` from a worker thread. glibc serves a
worker thread from its own arena, whose heaps are capped at 64 MB, so a block that large is
``mmap``-ed and, when the step ends, ``munmap``-ed: every step then touched about 100,000 fresh
pages, each a page fault that the kernel zero-fills (108,000 minor faults per step, measured).
With one arena (``M_ARENA_MAX``), no ``mmap`` for large blocks (``M_MMAP_MAX``) and no trimming of
the heap's top (``M_TRIM_THRESHOLD``), a freed block stays in the process and the next step
reuses it: no faults, and the probe's bf16 step ran 1.20x faster (2-core Intel Xeon with AMX).
The price is that memory XLA frees is kept for reuse rather than handed back to the system, as
tcmalloc and jemalloc do too, so the resident size stays at its high-water mark, and that mark
is higher: the probe's peak RSS went from 1,038 to 1,777 MiB in bf16. ``train.py`` uses it
(``--noreuse_host_memory`` turns it off), as does ``bench/train_speed.py`` (unless
``--default-allocator``); ``decode.py`` does not: translating the dev set was no
faster with it (41.9 against 41.4 sentences/s compiled) and its peak RSS grew from 860 to
1,263 MiB.

``tune_host_allocator()`` must run before JAX starts its backend (before the first computation,
``jax.devices()`` and the like): threads that already hold an arena keep it, and limiting the
arenas then made the faults worse (156,000 per step, measured), so it refuses, with a warning.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU: ``JAX_PLATFORMS`` names it first, or is unset and no
    accelerator plugin (CUDA, ROCm, TPU) is installed. Decided without starting a backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and importlib.util.find_spec("libtpu") is None


def tune_host_allocator(*, only_on_cpu: bool = True) -> bool:
    """Sets glibc's malloc so that XLA's CPU buffers are reused (see the module docstring).

    Args:
      only_on_cpu: leave the allocator alone when JAX will run on an accelerator, where host
        buffers are few and a single arena would only serialise the input pipeline's threads.

    Returns:
      Whether the settings were applied (False off glibc Linux, on an accelerator, or once JAX's
      backend has started).
    """
    if only_on_cpu and not runs_on_cpu():
        return False
    if _backend_started():
        log.warning("host allocator left as it is: JAX's backend has already started")
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    log.info("host allocator: one malloc arena, no mmap or trimming: %s", applied)
    return applied


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge  # no public API says whether the backend started

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False
