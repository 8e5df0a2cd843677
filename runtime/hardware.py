"""The compute dtype ``"auto"`` stands for on this machine, and the CPU's name and flags.

``dtype="auto"`` (``--config.model.overrides.dtype=auto``, the default config's setting) means
bf16 compute with float32 parameters, optimizer state and accumulation where the hardware has
fast bf16 matmuls (GPUs, TPUs, CPUs with AMX or AVX512-BF16) and float32 elsewhere: on a CPU
without those units XLA emulates bf16 matmuls, slower than float32 ones. The choice is made once,
when a workdir starts; a workdir that already has a ``model_config.json`` keeps the dtype written
there, so a run resumed on another machine computes as it started.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

# CPU flags (as /proc/cpuinfo spells them) with native bf16 matmul instructions.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# The flags bench/train_speed.py reports: what decides the speed of CPU matmuls.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def cpu_info(path: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags, read from ``path`` (Linux).

    Returns:
      ``(model name, flags)``; ``("unknown", frozenset())`` where the file is missing or
      unreadable (macOS, Windows), so callers treat the CPU as one without bf16 units.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "unknown", frozenset()
    name, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown":
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


def resolve_dtype(
    requested: str, *, backend: str | None = None, cpu_flags: frozenset[str] | None = None
) -> tuple[str, str]:
    """The compute dtype that ``requested`` stands for on this hardware.

    Args:
      requested: a dtype name, or ``"auto"``; anything but ``"auto"`` is returned as it is
        (``TransformerConfig`` validates it).
      backend: JAX's platform (``"cpu"``, ``"gpu"``, ``"tpu"``); default ``jax.default_backend()``.
      cpu_flags: the CPU's flags; default read from ``/proc/cpuinfo``. Used on CPUs only.

    Returns:
      ``(dtype, reason)``: the dtype name and why it was chosen, for the log.
    """
    if requested != "auto":
        return requested, "set in the config"
    backend = (backend or jax.default_backend()).lower()
    if backend in ACCELERATORS:
        return "bfloat16", f"dtype=auto on {backend}: bf16 matmul units"
    if backend != "cpu":
        return "float32", f"dtype=auto on an unknown backend {backend!r}: float32 to be safe"
    if cpu_flags is None:
        cpu_flags = cpu_info()[1]
    found = [f for f in BF16_CPU_FLAGS if f in cpu_flags]
    if found:
        return "bfloat16", f"dtype=auto on a CPU with {' and '.join(found)}: bf16 matmul units"
    return "float32", (
        f"dtype=auto on a CPU without {' or '.join(BF16_CPU_FLAGS)}: bf16 matmuls would be "
        "emulated, slower than float32"
    )


def resolve_decode_dtype(
    requested: str,
    trained: str,
    *,
    backend: str | None = None,
    cpu_flags: frozenset[str] | None = None,
) -> tuple[str, str]:
    """The compute dtype to translate in, for a model trained in ``trained``.

    ``"auto"`` is the training dtype on accelerators and on CPUs with AMX, and float32 on other
    CPUs. Without AMX, XLA's CPU bf16 matmuls are no faster than float32 ones and its bf16
    attention over the key/value cache converts the whole cache to float32 at every step: the
    default model translated the dev set 1.19x faster in float32 (2-core Intel Xeon with
    AVX512-BF16, no AMX). With AMX (``amx_bf16``) bf16 is the fast path: the default model
    translated the dev set 1.53x faster in bf16 (one process, passes alternated; 1.40-1.44x
    for the whole command), BLEU 17.39 against 17.38, 732 of 902 outputs the same as float32's
    (2-core Intel Xeon with AMX). A model trained in float32 (or float16) decodes in float32
    on CPUs. The weights are float32 either way.

    Args:
      requested: a dtype name (returned as it is) or ``"auto"``.
      trained: the model's training compute dtype.
      backend: JAX's platform; default ``jax.default_backend()``.
      cpu_flags: the CPU's flags; default read from ``/proc/cpuinfo``. Used on CPUs only.

    Returns:
      ``(dtype, reason)``.
    """
    if requested != "auto":
        return requested, "set by the caller"
    backend = (backend or jax.default_backend()).lower()
    if backend != "cpu":
        return trained, f"decode dtype=auto on {backend}: the training dtype {trained}"
    if trained != "bfloat16":  # float32, or float16: emulated on CPUs.
        return "float32", f"decode dtype=auto on CPU: float32 (trained in {trained})"
    if cpu_flags is None:
        cpu_flags = cpu_info()[1]
    if "amx_bf16" in cpu_flags:
        dtype = trained
        reason = f"decode dtype=auto on a CPU with amx_bf16: the training dtype {trained}"
    else:
        dtype = "float32"
        reason = (
            f"decode dtype=auto on a CPU without amx_bf16: float32, faster there than the "
            f"training dtype {trained}"
        )
    if (agreed := _process_0s_choice(dtype)) != dtype:
        dtype = agreed
        reason = f"decode dtype=auto: process 0 chose {dtype} (all processes decode alike)"
    return dtype, reason


def _process_0s_choice(dtype: str) -> str:
    """Process 0's pick between bfloat16 and float32, where this process picked ``dtype``:
    on several processes, unlike CPUs must still compile one program."""
    if jax.process_count() == 1:
        return dtype
    from jax.experimental import multihost_utils

    bf16 = multihost_utils.broadcast_one_to_all(np.int32(dtype == "bfloat16"))
    return "bfloat16" if bf16 else "float32"


def resolve_workdir_dtype(requested: str, saved: str | None = None) -> tuple[str, str]:
    """``resolve_dtype``, except that ``"auto"`` keeps ``saved``, the dtype an existing workdir
    was started with (a resumed run computes as it started, even on another machine). Several
    processes agree on process 0's choice (a cluster of unlike CPUs would otherwise compile
    different programs).

    Returns:
      ``(dtype, reason)``.
    """
    if requested == "auto" and saved:
        return saved, f"dtype=auto resuming a workdir: keeping its dtype {saved}"
    dtype, reason = resolve_dtype(requested)
    if requested == "auto" and (agreed := _process_0s_choice(dtype)) != dtype:
        dtype = agreed
        reason = f"dtype=auto: process 0 chose {dtype} (all processes compute alike)"
    return dtype, reason
