"""Trains the Transformer with the paper's recipe, over whatever devices exist.

    python train.py --config=configs/default.py --workdir=runs/default [--config.FIELD=VALUE ...]

Rerunning the same command resumes from the newest readable checkpoint in the workdir: the
parameters, Adam's moments, the step and the input iterator's position are restored, and the
dropout masks of step s are a function of (seed, s), so a run killed at any moment continues as
if it had never stopped. SIGTERM / SIGINT save a checkpoint and exit with 128 + signal. A damaged
checkpoint is set aside for the one before it; one that does not fit the configuration (say,
another optimizer) stops the run naming the differences, and --config.init_from=OLD_WORKDIR
starts a new workdir from its parameters with a fresh optimizer (see training/resume.py).

Every field of the config, with its meaning, is in configs/common.py; set any of them with
--config.FIELD=VALUE (model fields: --config.model.overrides.FIELD=VALUE). All of them, the data
files and the workdir are checked before anything is written there; a mistake is one ERROR line
and exit status 1. A workdir is used by one run at a time (workdirs/lock.py): a second
one is refused, naming the first one's PID and host.

Several hosts: start the same command on each with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or rely on the cluster environment JAX detects).
"""

from __future__ import annotations

import logging

import jax
from absl import flags
from ml_collections import config_flags

import cli
import data
from runtime.compilation_cache import enable_compilation_cache
from runtime.host_memory import tune_host_allocator
from training import loop
from workdirs import checkpoints
from workdirs import lock as workdir_lock

log = logging.getLogger("train")


def _maybe_initialize_distributed() -> None:
    if flags.FLAGS.num_processes and flags.FLAGS.num_processes > 1:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=flags.FLAGS.coordinator_address,
            num_processes=flags.FLAGS.num_processes,
            process_id=flags.FLAGS.process_id,
        )


def main():
    for noisy in ("jax._src",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise cli.UsageError("--config and --workdir are required")
    # Until the run is checked and holds its workdir, the log lines wait: a refused start prints
    # its one ERROR line alone.
    with cli.HeldLogs(ERRORS) as held:
        if flags.FLAGS.reuse_host_memory:
            tune_host_allocator()  # before JAX starts its backend
        _maybe_initialize_distributed()
        enable_compilation_cache()
        loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, on_start=held.release)


def define_flags() -> None:
    """Command-line flags; defined on demand so that importing this module defines none."""
    config_flags.DEFINE_config_file(
        "config", None,
        "Training configuration file (configs/default.py, configs/tiny.py, ...). Override any "
        "field with --config.FIELD=VALUE; every field and its meaning: configs/common.py.",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    flags.DEFINE_bool(
        "reuse_host_memory", True,
        "On CPU with glibc, keep XLA's freed buffers for reuse instead of faulting in fresh "
        "pages every step (runtime/host_memory.py): faster steps, a higher peak RSS.",
    )  # fmt: skip


# The errors that are a user's to fix: one ERROR line, exit status 1.
ERRORS = (
    data.DataError,
    loop.NonFiniteLossError,
    checkpoints.CheckpointError,
    workdir_lock.WorkdirLockError,
    FileNotFoundError,
    ValueError,
)

if __name__ == "__main__":
    cli.run(main, define_flags, "train", ERRORS)
