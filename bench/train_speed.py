"""Training throughput of the probe model, against the same model in torch, in the same run.

Probe: d_model 256, 4 heads, d_ff 1024, 3 + 3 layers, vocab 8,000, batches of 32 x 64 source
and 32 x 64 target tokens, dropout 0.1 on the embeddings and residuals only; torch does the
same work (``bench/torch_probe.py``), eager and compiled (``torch.compile``), the faster being
"best torch". Prints the machine (CPU model, the flags that decide matmul speed, JAX's backend
and devices, what dtype="auto" picks here) and both engines' threads, then tokens/s (source +
target), the median of several timed windows, achieved model GFLOP/s and their share of the
measured matmul peak of the row's dtype (measured in every window, between the steps, so that
both see the same load). The ratios come from the median windows, the fastest windows and
window by window, since the machines are shared. bf16 rows run only where the machine has
bf16 matmul units (on an AVX2-only CPU bf16 is emulated: say ``--dtypes float32,bfloat16`` to
time it anyway).

    python -m bench.train_speed [--steps 5] [--repeats 5] [--no-torch] [--no-compile]
                                [--dtypes float32,bfloat16]

torch is a benchmark-only dependency: ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results import markdown_table, write_result
from model import Transformer, TransformerConfig, make_mesh
from runtime.hardware import REPORTED_CPU_FLAGS, cpu_info, resolve_dtype
from runtime.host_memory import tune_host_allocator
from training.state import OptimizerConfig, init_state, make_optimizer, state_shardings
from training.step import make_train_step, train_flops_per_step

D, H, F, LAYERS, V, B, L = 256, 4, 1024, 3, 8000, 32, 64
# The probe model, defined once: both engines and the FLOP count use it.
PROBE = TransformerConfig(
    vocab_size=V, d_model=D, num_heads=H, d_ff=F, num_encoder_layers=LAYERS,
    num_decoder_layers=LAYERS, dropout_rate=0.1, max_positions=L,
)  # fmt: skip


def machine_line() -> str:
    """One line naming the machine: CPU model and flags, cores, JAX backend, dtype=auto's choice."""
    name, flags = cpu_info()
    present = " ".join(f"{f}:{'yes' if f in flags else 'no'}" for f in REPORTED_CPU_FLAGS)
    devices = jax.devices()
    auto, _ = resolve_dtype("auto", cpu_flags=flags)
    return (
        f"machine: {name}, {os.cpu_count()} cores, flags {present}; jax {jax.__version__} "
        f"{jax.default_backend()} x{len(devices)} ({devices[0].device_kind}); dtype=auto -> {auto}"
    )


# Compiled once per shape and dtype: the peak is measured again in every window.
_matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))


def matmul_peak(dtype, n=2048, repeats=5) -> float:
    """Measured GFLOP/s of an n^3 matmul with float32 accumulation: the fastest of ``repeats``.

    The fastest, not the median: on a shared 2-core machine one matmul in three or four can run
    at half speed (598-1,532 GFLOP/s for bf16 across 12 calls on an Intel Xeon with AMX), and a
    peak taken from a slow moment would flatter every share of it.
    """
    a = jnp.ones((n, n), dtype)
    _matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def batch(rng) -> dict:
    src = rng.integers(4, V, (1, B, L)).astype(np.int32)
    tgt = rng.integers(4, V, (1, B, L)).astype(np.int32)
    return {"inputs": src, "targets": tgt}


def paper_optimizer() -> OptimizerConfig:
    """The paper's Adam settings (warmup 4000, no clipping), as the benchmarks train."""
    return OptimizerConfig(
        warmup_steps=4000, lr_scale=1.0, adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9,
        grad_clip_norm=0.0,
    )  # fmt: skip


def flax_runner(dtype: str):
    """Compiles the train step once; returns ``run(steps) -> seconds per step``."""
    model = Transformer(dataclasses.replace(PROBE, dtype=dtype))
    tx, schedule = make_optimizer(paper_optimizer(), D)
    shardings, _ = state_shardings(model, tx, make_mesh(devices=jax.devices()[:1]))
    state = init_state(model, tx, shardings, jax.random.key(0))
    step = jax.jit(
        make_train_step(model, tx, schedule, bos_id=2, label_smoothing=0.1), donate_argnums=0
    )
    data = batch(np.random.default_rng(0))
    rng = jax.random.key(1)
    holder = {"state": step(state, data, rng)[0]}

    def run(steps):
        t = time.perf_counter()
        for _ in range(steps):
            holder["state"], m = step(holder["state"], data, rng)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    run(1)
    return run


def default_dtypes() -> list[str]:
    """float32 everywhere, and bfloat16 where it has matmul units (what ``dtype=auto`` would
    pick); on a CPU without them bf16 is emulated, slower than float32 and not worth timing."""
    auto, _ = resolve_dtype("auto", cpu_flags=cpu_info()[1])
    return ["float32"] + (["bfloat16"] if auto == "bfloat16" else [])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtypes", default=None,
        help="comma-separated; default float32, plus bfloat16 where the machine has bf16 units",
    )  # fmt: skip
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--no-compile", action="store_true", help="torch eager only (torch.compile takes minutes)"
    )
    parser.add_argument(
        "--default-allocator", action="store_true",
        help="leave glibc malloc as it is instead of train.py's tuning (runtime/host_memory.py)",
    )  # fmt: skip
    args = parser.parse_args()

    # As train.py does, before JAX starts its backend; torch, in the same process, shares it.
    tuned = not args.default_allocator and tune_host_allocator()
    dtypes = args.dtypes.split(",") if args.dtypes else default_dtypes()  # starts the backend
    machine = machine_line() + f"; host allocator {'tuned' if tuned else 'default'}"
    print(machine)
    if "bfloat16" not in dtypes:
        print("bf16 contenders skipped: no bf16 matmul units here (emulated bf16 is slower)")
    flops = train_flops_per_step(PROBE, B, L)
    tokens = 2 * B * L
    # Interleave the contenders window by window so machine noise hits them alike.
    contenders = {f"flax {d}": flax_runner(d) for d in dtypes}
    if not args.no_torch:
        import torch

        from bench import torch_probe

        torch.set_num_threads(os.cpu_count())
        threads = f"threads: XLA {os.cpu_count()} (all cores), torch {torch.get_num_threads()}"
        machine += f"; {threads}"
        print(threads)
        data, dims = batch(np.random.default_rng(0)), (D, H, F, LAYERS, V, L)
        for d in dtypes:
            for compiled in (False, True)[: 1 if args.no_compile else 2]:
                name = f"torch {d} {'compiled' if compiled else 'eager'}"
                contenders[name] = torch_probe.runner(
                    data, dims, bf16=d == "bfloat16", compiled=compiled
                )
    results: dict[str, list[float]] = {}
    peaks = {d: [] for d in dtypes}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            results.setdefault(name, []).append(run(args.steps))
        # The peak is measured in every window too, under the same load as the steps.
        for d, measured in peaks.items():
            measured.append(matmul_peak(jnp.dtype(d)))
    peak = {d: statistics.median(p) for d, p in peaks.items()}
    peak_line = "matmul peak (2048^3, f32 accumulation, fastest of 5 per window, median): " + (
        ", ".join(f"{d} {peak[d]:.0f} GFLOP/s" for d in dtypes)
    )
    print(peak_line)
    header = ("implementation", "s/step", "fastest", "tokens/s", "GFLOP/s", "% of peak")
    print("{:26s} {:>8s} {:>8s} {:>10s} {:>8s} {:>10s}".format(*header))
    rows = []
    for name, windows in results.items():
        sec = statistics.median(windows)
        gflops = flops / sec / 1e9
        share = 100 * gflops / peak[name.split()[1]]
        print(
            f"{name:26s} {sec:8.4f} {min(windows):8.4f} {tokens / sec:10.0f} {gflops:8.1f} "
            f"{share:9.1f}%"
        )
        rows.append((name, f"{sec:.4f}", f"{min(windows):.4f}", f"{tokens / sec:,.0f}",
                     f"{gflops:.1f}", f"{share:.1f}%"))  # fmt: skip
    ratios = []
    # Load from other tenants comes in episodes of several windows: the fastest windows and
    # the window-by-window ratios say how much of a median ratio is the machine's noise.
    for d in dtypes:
        torches = {n: w for n, w in results.items() if n.startswith(f"torch {d} ")}
        if not torches:
            continue
        best = min(torches, key=lambda n: statistics.median(torches[n]))
        ref, windows = torches[best], results[f"flax {d}"]
        paired = [r / w for r, w in zip(ref, windows, strict=True)]
        ratios.append(
            f"speed of flax {d} / best torch {d} ({best.split()[-1]}): "
            f"{statistics.median(ref) / statistics.median(windows):.2f}x "
            f"(fastest windows {min(ref) / min(windows):.2f}x; window by window "
            f"{min(paired):.2f}-{max(paired):.2f}x)"
        )
        print(ratios[-1])
    median = f"median of {args.repeats} windows of {args.steps} steps"
    table = markdown_table(
        ("implementation", f"s/step ({median})", "fastest window", "tokens/s", "GFLOP/s",
         "% of the dtype's matmul peak"), rows,
    )  # fmt: skip
    text = "\n\n".join([machine, peak_line, table, "\n".join(f"- {r}" for r in ratios)])
    print(f"wrote {write_result('train_speed', text, argv=None)}")


if __name__ == "__main__":
    main()
