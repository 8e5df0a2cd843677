"""Compile time and memory of a preset's train step, by ``scan_layers`` and ``remat`` setting.

Compiles ahead of time (``jax.jit(...).lower(...).compile()``: nothing runs, so the big model
fits any machine) and reads XLA's memory analysis of the compiled step: the temporaries it
needs beyond its arguments (activations kept for the backward pass, workspace) and the total
with the arguments (parameters, Adam's moments, the batch).

    python -m bench.compile_memory [--presets base,big] [--rows 100 --length 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bench.results import write_result
from bench.train_speed import machine_line, paper_optimizer
from model import Transformer, TransformerConfig
from training.state import TrainState, make_optimizer
from training.step import make_train_step

VARIANTS = (  # (scan_layers, remat)
    (False, "none"),
    (True, "none"),
    (True, "dots"),
    (True, "full"),
    (False, "full"),
)


def measure(preset: str, scan: bool, remat: str, *, vocab, rows, length, dtype) -> dict:
    """AOT-compiles the train step of one setting; returns seconds and bytes."""
    cfg = getattr(TransformerConfig, preset)(
        vocab, max_positions=max(length, 64), dtype=dtype, scan_layers=scan, remat=remat
    )
    model = Transformer(cfg)
    tx, schedule = make_optimizer(paper_optimizer(), cfg.d_model)
    ids = jnp.ones((1, 8), jnp.int32)

    def init(key):
        from flax import linen as nn

        params = nn.unbox(model.init(key, ids, ids))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    state = jax.eval_shape(init, jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct((1, rows, length), jnp.int32) for k in ("inputs", "targets")}
    step = make_train_step(model, tx, schedule, bos_id=2, label_smoothing=0.1)
    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0,)).lower(state, batch, jax.random.key(1))
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "compile_s": seconds,
        "temp": memory.temp_size_in_bytes,
        "total": memory.temp_size_in_bytes + memory.argument_size_in_bytes,
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="base,big")
    parser.add_argument("--vocab", type=int, default=37_000)
    parser.add_argument("--rows", type=int, default=100, help="rows per step and side")
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    lines = [
        machine_line(),
        "",
        f"train step, {args.rows} x {args.length} source + target tokens, {args.dtype} compute, "
        f"vocab {args.vocab:,}; AOT compile on {jax.devices()[0].platform}",
        "",
        "| preset | scan_layers | remat | compile s | temporaries MiB | with arguments MiB |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(line for line in lines if line))
    for preset in args.presets.split(","):
        for scan, remat in VARIANTS:
            m = measure(preset, scan, remat, vocab=args.vocab, rows=args.rows,
                        length=args.length, dtype=args.dtype)  # fmt: skip
            lines.append(
                f"| {preset} ({m['params'] / 1e6:.0f}M) | {scan} | {remat} | "
                f"{m['compile_s']:.1f} | {m['temp'] / 2**20:.1f} | {m['total'] / 2**20:.1f} |"
            )
            print(lines[-1], flush=True)
    path = write_result("compile_memory", "\n".join(lines), argv=argv)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
