"""Runs three train steps of a tiny model on a 2-device data-parallel mesh and prints the losses.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT

With NUM_PROCESSES=2 each process owns one CPU device and feeds its half of every batch
(``jax.distributed`` with gloo collectives). ``losses`` is also what the test computes in its
own process, over two of its devices, for the printed losses to agree with.
"""

import json
import os
import sys


def losses(mesh, process_id: int = 0, num_processes: int = 1) -> list[float]:
    """Three steps' losses on ``mesh`` (2 devices), this process feeding its share of rows."""
    import jax
    import numpy as np

    from model import Transformer, TransformerConfig, use_mesh
    from training.state import OptimizerConfig, init_state, make_optimizer, state_shardings
    from training.step import jit_train_step, train_batch_sharding

    model = Transformer(TransformerConfig.tiny(64))
    opt = OptimizerConfig(
        warmup_steps=10, lr_scale=1.0, adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9, grad_clip_norm=0
    )
    tx, schedule = make_optimizer(opt, 32)
    shardings, _ = state_shardings(model, tx, mesh)
    state = init_state(model, tx, shardings, jax.random.key(0))
    step = jit_train_step(model, tx, schedule, mesh, shardings, bos_id=2, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    out = []
    with use_mesh(mesh):
        for _ in range(3):
            full = {
                k: rng.integers(3, 64, (1, 4, 12)).astype(np.int32) for k in ("inputs", "targets")
            }
            rows = 4 // num_processes
            local = {k: v[:, process_id * rows : (process_id + 1) * rows] for k, v in full.items()}
            batch = jax.make_array_from_process_local_data(train_batch_sharding(mesh), local)
            state, metrics = step(state, batch, jax.random.key(1))
            out.append(float(metrics["loss"]))
    return out


if __name__ == "__main__":
    process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 // num_processes}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax

    from model import make_mesh

    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.device_count() == 2, jax.devices()
    print(
        json.dumps(
            {"process": process_id, "losses": losses(make_mesh(), process_id, num_processes)}
        )
    )
