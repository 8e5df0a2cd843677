"""Trains the Transformer with the paper's recipe, over whatever devices exist.

    python train.py --config=configs/default.py --workdir=runs/default [--config.FIELD=VALUE ...]

Rerunning the same command resumes from the newest readable checkpoint in the workdir: the
parameters, Adam's moments, the step and the input iterator's position are restored, and the
dropout masks of step s are a function of (seed, s), so a run killed at any moment continues as
if it had never stopped. SIGTERM / SIGINT save a checkpoint and exit with 128 + signal. A damaged
checkpoint is set aside for the one before it; one that does not fit the configuration (say,
another optimizer) stops the run naming the differences, and --config.init_from=OLD_WORKDIR
starts a new workdir from its parameters with a fresh optimizer (see training/resume.py).

Several hosts: start the same command on each with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or rely on the cluster environment JAX detects).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

import data
from data.tokenizer import workdir_tokenizer, workdir_tokenizer_files
from model import Transformer, make_mesh, use_mesh
from model.compilation import enable_compilation_cache
from training import budget, checkpoints, evaluation, hardware, resume
from training.loop_tools import StopSignal, Window
from training.metrics import MetricsWriter, Stopwatch
from training.state import OptimizerConfig, make_optimizer, model_config, state_shardings
from training.step import jit_train_step, make_eval_step, train_batch_sharding, train_flops_per_step

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def _next_batch(iterator, micro_batches: int) -> dict[str, np.ndarray]:
    """``[A, R, L]`` arrays: A micro-batches from the process-local iterator, stacked."""
    parts = [next(iterator) for _ in range(micro_batches)]
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


@dataclasses.dataclass
class _Run:
    """Everything the training loop works with, built by ``_setup``."""

    config: ml_collections.ConfigDict
    mesh: Any
    iterator: Any
    state: Any
    train_step: Callable
    evaluator: evaluation.Evaluator
    mngr: Any  # the last K checkpoints
    best_mngr: Any  # the best parameters by dev BLEU
    writer: MetricsWriter
    clock: Stopwatch
    flops: float  # model FLOPs of one step
    best_bleu: float
    batch: dict  # the batch layout, saved with each checkpoint
    plan: budget.Plan  # the last step and the schedule numbers that depend on it
    measure: bool  # True: plan is provisional until the first steps are timed (train_minutes)
    started: float = dataclasses.field(default_factory=time.monotonic)  # train_minutes counts


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) training; returns the last metrics row written."""
    wall = time.monotonic()
    budget.check_config(config)  # before minutes of data and tokenizer set-up
    config = hardware.resolve_config(config, workdir)  # dtype=auto -> this machine's choice
    run = _setup(config, Path(workdir))
    run.started = wall
    stop = StopSignal()
    try:
        with use_mesh(run.mesh):
            last_row = _loop(run, stop)
    finally:
        # Whatever stops the loop (an error, a signal), the last good checkpoint must be durable.
        checkpoints.finish(run.mngr)
        run.writer.close()
        stop.restore()
    step = int(run.state.step)
    log.info("done: %d steps in %.1f min (wall %.1f min)", step, run.clock() / 60, _minutes(wall))
    if run.plan.train_minutes:
        log.info("train_minutes=%g: this session took %.1f min", run.plan.train_minutes,
                 _minutes(wall))  # fmt: skip
    return last_row


def _setup(config: ml_collections.ConfigDict, workdir: Path) -> _Run:
    """Data, tokenizer, model, mesh, optimizer, compiled steps; resumes from ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    train_pairs = data.open_split(config.data, "train")
    dev_pairs = data.open_split(config.data, "dev")
    source = None
    if config.get("init_from"):
        source, _ = resume.parse_init_from(config.init_from, workdir)  # refuses a bad value
        if not resume.has_checkpoints(workdir):
            # Fine-tuning: parameters only make sense with the tokenizer they were trained with.
            resume.copy_tokenizer(source, workdir)
    # One process trains it; the others load the same file.
    if jax.process_index() == 0 and not workdir_tokenizer_files(workdir):
        data.train_tokenizer(
            train_pairs, workdir / "tokenizer.model", vocab_size=config.vocab_size, seed=config.seed
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer written")
    tokenizer = workdir_tokenizer(workdir)
    if config.model.preset == "init_from":
        model_cfg = resume.source_model_config(config, source)
    else:
        model_cfg = model_config(config, tokenizer.vocab_size)
    if config.max_len > model_cfg.max_len:
        raise ValueError(
            f"config.max_len={config.max_len} exceeds the model's max_len={model_cfg.max_len}"
        )
    resume.check_model_config(workdir, model_cfg)
    model = Transformer(model_cfg)

    mesh = make_mesh(**config.mesh)
    rows, batch = _batch_layout(config, train_pairs, tokenizer, mesh)
    dataset = data.train_dataset(
        train_pairs,
        tokenizer,
        max_len=config.max_len,
        rows=rows // jax.process_count(),
        seed=config.seed,
        overlong=config.overlong,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterator = iter(dataset)

    tx, schedule = make_optimizer(OptimizerConfig.from_config(config), model_cfg.d_model)
    shardings, abstract = state_shardings(model, tx, mesh)
    mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
    best_mngr = checkpoints.manager(workdir, "best", keep=1)
    state, data_state, meta = resume.start_state(
        config, workdir, model=model, model_cfg=model_cfg, tx=tx, shardings=shardings,
        abstract=abstract, mngr=mngr, batch=batch,
    )  # fmt: skip
    if data_state is not None:
        iterator.set_state(data_state)
    plan, measure = budget.start_plan(config, meta)
    log.info("model: %s parameters", f"{_count(state.params):,}")
    resume.write_configs(workdir, config, model_cfg)
    # A run stopped right after a new best checkpoint has not yet recorded its BLEU elsewhere.
    best_bleu = max(meta.get("best_bleu", -1.0), checkpoints.best_score(best_mngr) or -1.0)

    train_step = jit_train_step(
        model, tx, schedule, mesh, shardings,
        bos_id=tokenizer.bos_id, label_smoothing=config.label_smoothing,
    )  # fmt: skip
    eval_step = jax.jit(
        make_eval_step(model, bos_id=tokenizer.bos_id, label_smoothing=config.label_smoothing)
    )
    evaluator = evaluation.Evaluator(
        model, tokenizer, dev_pairs, config, mesh=mesh, eval_step=eval_step
    )
    return _Run(
        config=config,
        mesh=mesh,
        iterator=iterator,
        state=state,
        train_step=train_step,
        evaluator=evaluator,
        mngr=mngr,
        best_mngr=best_mngr,
        writer=MetricsWriter(workdir, plan.num_train_steps, int(state.step)),
        clock=Stopwatch(meta.get("elapsed_s", 0.0)),
        flops=train_flops_per_step(model_cfg, rows * config.grad_accum_steps, config.max_len),
        best_bleu=best_bleu,
        batch=batch,
        plan=plan,
        measure=measure,
    )


def _batch_layout(config, train_pairs, tokenizer, mesh) -> tuple[int, dict]:
    """Rows per micro-batch (global) whose real tokens per step match ``tokens_per_step``.

    Returns:
      ``(rows, layout)``; the layout is saved with every checkpoint, and a checkpoint saved
      with another one cannot resume this run (its input position means other examples).
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = config.grad_accum_steps
    fill = data.packing_fill(
        train_pairs, tokenizer, max_len=config.max_len, overlong=config.overlong, seed=config.seed
    )
    rows = data.rows_per_step(
        config.tokens_per_step, config.max_len, shards, fill=fill, micro_batches=accum
    )
    if rows % jax.process_count():
        raise ValueError(
            f"{rows} rows per micro-batch do not split over {jax.process_count()} hosts"
        )
    real = accum * rows * config.max_len * fill
    log.info(
        "batches: %d x %d rows of %d per step, packed %.1f%% full: about %s real tokens per "
        "side (tokens_per_step=%s)",
        accum, rows, config.max_len, 100 * fill, f"{real:,.0f}", f"{config.tokens_per_step:,}",
    )  # fmt: skip
    if abs(real / config.tokens_per_step - 1) > 0.1:
        log.warning(
            "the nearest batch layout holds %.0f%% of tokens_per_step: a step's rows are a "
            "multiple of %d (devices x micro-batches) of about %.0f tokens each",
            100 * real / config.tokens_per_step, shards * accum, config.max_len * fill,
        )  # fmt: skip
    layout = {"rows": rows, "micro_batches": accum, "max_len": config.max_len}
    return rows, layout


def _loop(run: _Run, stop: StopSignal) -> dict:
    """Trains from ``run.state.step`` to ``run.plan``'s last step; returns the last metrics row."""
    config = run.config
    rng = jax.random.key(config.seed)
    step = int(run.state.step)
    last_row: dict = {}
    window = Window()
    last_save = time.monotonic()
    pending = None  # (step, metrics) of the previous step, checked after the next dispatch
    compile_s = None
    horizon = run.plan.horizon()  # the schedule's numbers, an input of the compiled step
    probe = None  # times the first steps when train_minutes chooses the number of steps
    while step < run.plan.num_train_steps:
        local = _next_batch(run.iterator, config.grad_accum_steps)
        tokens = int((local["inputs"] > 0).sum() + (local["targets"] > 0).sum())
        batch = jax.make_array_from_process_local_data(train_batch_sharding(run.mesh), local)
        run.state, metrics = run.train_step(run.state, batch, rng, horizon)
        if compile_s is None:  # the first step compiles; keep it out of throughput figures
            jax.block_until_ready(metrics)
            compile_s = window.reset()
            log.info("first step (with compilation) took %.1f s", compile_s)
            probe = budget.SpeedProbe() if run.measure else None
        else:
            window.add(tokens)
            if probe is not None:
                probe.add(tokens)
        _check_finite(pending)
        step += 1
        pending = (step, metrics)
        if probe is not None and probe.due():
            _choose_steps(run, step, probe, metrics)
            horizon, probe = run.plan.horizon(), None

        is_last = step == run.plan.num_train_steps
        if step % config.log_every_steps == 0 or is_last:
            _check_finite(pending)
            last_row = _log_step(run, step, metrics, window, compile_s)
            compile_s = 0.0
        # Evaluation and checkpoints are not training time (nor part of the speed measured).
        with window.paused(), probe.paused() if probe else contextlib.nullcontext():
            at_end = is_last and config.eval_at_end
            if _evaluation_due(config, step, at_end):
                _check_finite(pending)
                _evaluate(run, step, at_end)
            check_signal = jax.process_count() == 1 or step % config.log_every_steps == 0
            stopping = check_signal and stop.agreed()
            minutes = (time.monotonic() - last_save) / 60
            if (
                step % config.checkpoint_every_steps == 0
                or minutes >= config.checkpoint_every_minutes
                or is_last
                or stopping
            ):
                _check_finite(pending)  # never save a state whose loss is not finite
                checkpoints.save(
                    run.mngr,
                    run.state,
                    run.iterator.get_state(),
                    {
                        "elapsed_s": run.clock(),
                        "best_bleu": run.best_bleu,
                        "seed": config.seed,
                        "batch": run.batch,
                        "config": resume.config_dict(config),
                        # The steps train_minutes chose: a resumed run keeps them.
                        **({"plan": run.plan.to_dict()} if run.plan.train_minutes else {}),
                    },
                )
                log.info("checkpoint saved at step %d", step)
                last_save = time.monotonic()
        if stopping:
            sys.exit(128 + stop.signum if stop.signum else 128 + signal.SIGTERM)
    return last_row


def _choose_steps(run: _Run, step: int, probe: budget.SpeedProbe, metrics) -> None:
    """Replaces the provisional plan by the one that fits ``train_minutes`` (training.budget)."""
    jax.block_until_ready(metrics)  # the steps dispatched so far have run
    elapsed_s = time.monotonic() - run.started
    plan = budget.plan_from_speed(
        run.config, step=step, seconds_per_step=probe.seconds() / probe.steps, elapsed_s=elapsed_s
    )
    run.plan, run.measure = budget.share(plan), False
    log.info("%s", budget.describe(run.plan, run.config, step=step, elapsed_s=elapsed_s))
    run.writer.set_total(run.plan.num_train_steps)


def _log_step(run: _Run, step: int, metrics, window: Window, compile_s: float) -> dict:
    """Writes one training row (loss, learning rate, throughput, memory) and resets the window."""
    values = jax.device_get(metrics)
    seconds = max(window.seconds(), 1e-9)
    row = {
        "loss": values["loss"],
        "nll": values["nll"],
        "learning_rate": values["learning_rate"],
        "grad_norm": values["grad_norm"],
        "tokens_per_sec": window.tokens * jax.process_count() / seconds,
        "model_flops_per_sec": run.flops * window.steps / seconds,
        "steps_per_sec": window.steps / seconds,
        "elapsed_s": run.clock(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if compile_s:
        row["compile_s"] = compile_s
    run.writer.write(step, row)
    run.writer.progress(step, f"loss {row['loss']:.3f} {row['tokens_per_sec']:.0f} tok/s")
    window.reset()
    return row


def _loss_due(config, step: int, at_end: bool) -> bool:
    return bool(config.eval_every_steps) and (step % config.eval_every_steps == 0 or at_end)


def _bleu_due(config, step: int, at_end: bool) -> bool:
    return bool(config.bleu_every_steps and step % config.bleu_every_steps == 0) or at_end


def _evaluation_due(config, step: int, at_end: bool) -> bool:
    return _loss_due(config, step, at_end) or _bleu_due(config, step, at_end)


def _evaluate(run: _Run, step: int, at_end: bool) -> None:
    """Dev loss and dev BLEU when due; keeps the parameters with the best BLEU."""
    config = run.config
    if _loss_due(config, step, at_end):
        row = {**run.evaluator.dev_loss(run.state.params), "elapsed_s": run.clock()}
        run.writer.write(step, row)
        log.info("step %d: dev loss %.3f ppl %.2f", step, row["dev_loss"], row["dev_ppl"])
    if _bleu_due(config, step, at_end):
        row = {**run.evaluator.bleu(run.state.params), "elapsed_s": run.clock()}
        run.writer.write(step, row)
        if row["bleu"] > run.best_bleu:
            run.best_bleu = row["bleu"]
            if step in run.best_mngr.all_steps():  # saved before a restart; the same parameters
                log.info("best checkpoint %d exists already; keeping it", step)
            else:
                checkpoints.save_params(
                    run.best_mngr, step, run.state.params, {"bleu": row["bleu"]}
                )


def _check_finite(pending) -> None:
    """Stops training at the first step whose loss is not finite; nothing bad is saved."""
    if pending is None:
        return
    step, metrics = pending
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step}; stopping. The last checkpoint in the "
            "workdir is from before this step; lower lr_scale or enable grad_clip_norm"
        )


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _minutes(start: float) -> float:
    return (time.monotonic() - start) / 60


def _maybe_initialize_distributed() -> None:
    if flags.FLAGS.num_processes and flags.FLAGS.num_processes > 1:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=flags.FLAGS.coordinator_address,
            num_processes=flags.FLAGS.num_processes,
            process_id=flags.FLAGS.process_id,
        )


def main(argv):
    del argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    _maybe_initialize_distributed()
    enable_compilation_cache()
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (
        data.DataError,
        NonFiniteLossError,
        checkpoints.CheckpointError,
        FileNotFoundError,
        ValueError,
    ) as err:
        log.error("%s", err)
        sys.exit(1)


def define_flags() -> None:
    """Command-line flags; defined on demand so that importing this module defines none."""
    config_flags.DEFINE_config_file(
        "config", None, "Training configuration file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
