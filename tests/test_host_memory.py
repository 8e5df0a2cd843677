"""The host allocator tuning: XLA's CPU buffers reused without page faults, and never applied
where it would not help."""

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import jax

from runtime import host_memory

REPO = Path(__file__).resolve().parents[1]

# A program whose [4096, 4096] float32 product (64 MB) is a temporary buffer of each execution.
SCRIPT = """
import resource, sys
import jax, jax.numpy as jnp
from runtime.host_memory import tune_host_allocator
applied = tune_host_allocator() if sys.argv[1] == "tuned" else False
f = jax.jit(lambda a, b: jnp.sum(jnp.sin(a @ b), axis=0))
a, b = jnp.ones((4096, 64)), jnp.ones((64, 4096))
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: while the heap grows to its working size, the first few calls fault too.
print(applied, sorted(faults)[len(faults) // 2])
"""


def faults_per_call(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    ).stdout.split()  # fmt: skip
    return out[0], float(out[1])


def test_tuned_allocator_reuses_buffers_without_page_faults():
    applied, tuned = faults_per_call("tuned")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert applied == "False"  # the settings are glibc's: elsewhere nothing is changed
        return
    _, default = faults_per_call("default")
    assert applied == "True"
    # 64 MB of fresh pages is 16,384 faults; reused memory faults almost never.
    assert default > 8000, default
    assert tuned < 200, tuned


def test_refused_once_the_backend_runs(caplog):
    jax.devices()  # this process's backend is running: tuning now would make things worse
    assert host_memory.tune_host_allocator() is False
    assert "already started" in caplog.text


def test_only_on_cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.runs_on_cpu()
    assert host_memory.tune_host_allocator() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    plugin = importlib.metadata.EntryPoint("cuda", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [plugin])
    assert not host_memory.runs_on_cpu()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
    assert host_memory.runs_on_cpu()
