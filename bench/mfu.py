"""Model FLOPs utilisation (MFU) of a preset's train step on the local accelerators.

The issue's GPU figure: the paper's big model, bf16 compute, float32 parameters and Adam state,
one device, a paper-sized batch (about 25k source + 25k target tokens):

    python -m bench.mfu --preset big --rows 96 --length 256 --accum 1

MFU = model FLOPs per second (matmuls only, forward + backward, as ``train_flops_per_step``
counts them) / peak. Two peaks are printed: the measured bf16 matmul peak of one device
(an n^3 matmul with float32 accumulation) and, where the device is known, its datasheet dense
bf16 peak, the usual denominator. On a CPU it runs too (try ``--preset tiny``), which is how CI
keeps it working.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results import markdown_table, write_result
from bench.train_speed import matmul_peak, paper_optimizer
from model import Transformer, TransformerConfig, make_mesh, use_mesh
from training.state import init_state, make_optimizer, state_shardings
from training.step import jit_train_step, train_batch_sharding, train_flops_per_step

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), TFLOP/s per device.
DATASHEET_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def datasheet_peak(device: jax.Device) -> float | None:
    """The datasheet bf16 TFLOP/s of ``device``, or None for a device not in the table."""
    kind = device.device_kind
    for name, tflops in DATASHEET_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            if name == "H100" and "PCIe" in kind:
                return 756.0
            return tflops
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="big", choices=("base", "big", "tiny"))
    parser.add_argument("--vocab", type=int, default=37_000)
    parser.add_argument("--rows", type=int, default=96, help="rows per micro-batch, all devices")
    parser.add_argument("--length", type=int, default=256, help="tokens per row and side")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows (median)")
    parser.add_argument("--matmul_n", type=int, default=0, help="0: 8192 on GPU/TPU, 2048 on CPU")
    args = parser.parse_args()

    devices = jax.devices()
    n = args.matmul_n or (2048 if devices[0].platform == "cpu" else 8192)
    measured = matmul_peak(jnp.bfloat16, n) / 1e3  # TFLOP/s
    sheet = datasheet_peak(devices[0])
    cfg = getattr(TransformerConfig, args.preset)(
        args.vocab, max_positions=max(args.length, 64), dtype=args.dtype
    )
    model = Transformer(cfg)
    tx, schedule = make_optimizer(paper_optimizer(), cfg.d_model)
    mesh = make_mesh(devices=devices)
    shardings, _ = state_shardings(model, tx, mesh)
    state = init_state(model, tx, shardings, jax.random.key(0))
    step = jit_train_step(model, tx, schedule, mesh, shardings, bos_id=2, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    shape = (args.accum, args.rows, args.length)
    host = {k: rng.integers(4, args.vocab, shape).astype(np.int32) for k in ("inputs", "targets")}
    batch = jax.device_put(host, train_batch_sharding(mesh))
    key = jax.random.key(1)

    with use_mesh(mesh):
        t = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t
        windows = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, batch, key)
            jax.block_until_ready(metrics)
            windows.append((time.perf_counter() - t) / args.steps)
    if not np.isfinite(float(metrics["loss"])):
        raise SystemExit(f"loss is {float(metrics['loss'])}: the timing is meaningless")

    sec = statistics.median(windows)
    flops = train_flops_per_step(cfg, args.rows * args.accum, args.length)
    per_device = flops / sec / len(devices) / 1e12
    params = sum(x.size for x in jax.tree.leaves(state.params))
    tokens = 2 * args.rows * args.accum * args.length
    lines = [
        ("device", f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"),
        ("model", f"{args.preset}, {params / 1e6:.1f}M parameters, {args.dtype} compute, "
                  f"{tokens:,} tokens per step (source + target)"),
        ("first step (compile + run)", f"{compile_s:.1f} s"),
        ("step", f"{sec * 1e3:.1f} ms (median of {args.repeats} x {args.steps}); "
                 f"{tokens / sec:,.0f} tokens/s"),
        ("model FLOP/s per device", f"{per_device:.2f} TFLOP/s"),
        (f"MFU vs measured {n}^3 bf16 matmul peak ({measured:.2f} TFLOP/s)",
         f"{per_device / measured:.1%}"),
    ]  # fmt: skip
    if sheet:
        lines.append(
            (f"MFU vs datasheet bf16 peak ({sheet:.0f} TFLOP/s)", f"{per_device / sheet:.1%}")
        )
    else:
        unknown = f"no datasheet peak known for {devices[0].device_kind!r}"
        lines.append(("MFU vs datasheet bf16 peak", unknown))
    for what, result in lines:
        print(f"{what}: {result}")
    print(f"wrote {write_result('mfu', markdown_table(('what', 'result'), lines), argv=None)}")


if __name__ == "__main__":
    main()
