"""The training loop: steps, logging, evaluation, checkpoints, until the plan's last step.

`train_and_evaluate` is what ``python train.py`` runs (and what tests and the notebook call):
`training.config_checks` refuses whatever cannot run before anything is written, the workdir is
created and locked (`workdirs.lock`), `training.setup` builds the run, `_loop` trains
it, and whatever stops the loop, the last checkpoint is made durable before returning or
raising.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np

from model import use_mesh
from training import budget, config_checks, resume
from training.metrics import Window
from training.setup import Run, setup
from training.step import train_batch_sharding
from training.stop_signal import StopSignal
from workdirs import checkpoints
from workdirs import lock as workdir_lock
from workdirs.files import config_dict

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def _next_batch(iterator, micro_batches: int) -> dict[str, np.ndarray]:
    """``[A, R, L]`` arrays: A micro-batches from the process-local iterator, stacked."""
    parts = [next(iterator) for _ in range(micro_batches)]
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    on_start: Callable[[], None] | None = None,
) -> dict:
    """Runs (or resumes) training; returns the last metrics row written.

    Args:
      config: the training configuration (``configs/common.py``).
      workdir: the directory to train in (created if needed).
      on_start: called once every check passed and the workdir is locked, before anything is
        written there (``train.py`` then prints the log lines it held back).
    """
    wall = time.monotonic()
    workdir = Path(workdir)
    config_checks.check_config(config)  # each field, before anything else
    config = resume.resolve_config(config, workdir)  # dtype=auto -> this machine's choice
    # Everything else that can refuse the run, before a byte is written to the workdir.
    start = config_checks.check_start(config, workdir)
    with workdir_lock.hold_for_run(workdir):  # one process at a time in a workdir
        if on_start is not None:
            on_start()
        run = setup(config, workdir, start)
        run.started = wall
        stop = StopSignal()
        try:
            with use_mesh(run.mesh):
                last_row = _loop(run, stop)
        finally:
            # Whatever stops the loop (an error, a signal), the last good checkpoint must be
            # durable.
            checkpoints.finish(run.mngr)
            run.writer.close()
            stop.restore()
    step = int(run.state.step)
    log.info("done: %d steps in %.1f min (wall %.1f min)", step, run.clock() / 60, _minutes(wall))
    if run.plan.train_minutes:
        log.info("train_minutes=%g: this session took %.1f min", run.plan.train_minutes,
                 _minutes(wall))  # fmt: skip
    return last_row


def _loop(run: Run, stop: StopSignal) -> dict:
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
    first_look = second_look = None  # (step, time) of the choice; the step of the second look
    eval_s = 0.0  # the last evaluation's duration, kept for the final one by the second look
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
                jax.block_until_ready(metrics)  # time the step itself, not its dispatch
                probe.add(tokens)
        _check_finite(pending)
        step += 1
        pending = (step, metrics)
        if probe is not None and probe.due():
            _choose_steps(run, step, probe, metrics)
            horizon, probe = run.plan.horizon(), None
            first_look, second_look = (step, time.monotonic()), budget.replan_step(run.plan, step)
        elif step == second_look:
            _look_again(run, step, first_look, eval_s, metrics)
            horizon = run.plan.horizon()

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
                started = time.monotonic()
                _evaluate(run, step, at_end)
                eval_s = time.monotonic() - started
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
                        "best_score": run.best_score,
                        "best_bleu": run.best_score,  # read by runs from before best_score
                        "seed": config.seed,
                        "batch": run.batch,
                        "config": config_dict(config),
                        # The steps train_minutes chose: a resumed run keeps them.
                        **({"plan": run.plan.to_dict()} if run.plan.train_minutes else {}),
                    },
                )
                log.info("checkpoint saved at step %d", step)
                last_save = time.monotonic()
        if stopping:
            sys.exit(128 + stop.signum if stop.signum else 128 + signal.SIGTERM)
    return last_row


def _choose_steps(run: Run, step: int, probe: budget.SpeedProbe, metrics) -> None:
    """Replaces the provisional plan by the one that fits ``train_minutes`` (training.budget)."""
    jax.block_until_ready(metrics)  # the steps dispatched so far have run
    elapsed_s = time.monotonic() - run.started
    plan = budget.plan_from_speed(
        run.config, step=step, seconds_per_step=probe.seconds_per_step(), elapsed_s=elapsed_s
    )
    run.plan, run.measure = budget.share(plan), False
    log.info("%s", budget.describe(run.plan, run.config, step=step, elapsed_s=elapsed_s))
    run.writer.set_total(run.plan.num_train_steps)


def _look_again(run: Run, step: int, first_look: tuple[int, float], eval_s: float, metrics):
    """Sets the last step again from the rate since the first look (``training.budget.replan``)."""
    jax.block_until_ready(metrics)
    now = time.monotonic()
    rate = (now - first_look[1]) / (step - first_look[0])
    before = run.plan.num_train_steps
    plan = budget.replan(
        run.plan, run.config, step=step, seconds_per_step=rate, elapsed_s=now - run.started,
        final_eval_s=eval_s,
    )  # fmt: skip
    run.plan = budget.share(plan)
    log.info(
        "train_minutes=%g: %.3f s/step since step %d, evaluations and checkpoints included, "
        "%.1f min spent by step %d: training to step %d instead of %d",
        plan.train_minutes, rate, first_look[0], (now - run.started) / 60, step,
        run.plan.num_train_steps, before,
    )  # fmt: skip
    run.writer.set_total(run.plan.num_train_steps)


def _log_step(run: Run, step: int, metrics, window: Window, compile_s: float) -> dict:
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


def _bleu_due(config, step: int, at_end: bool, translates: bool = True) -> bool:
    if not translates:  # a language model of the family: nothing to translate
        return False
    return bool(config.bleu_every_steps and step % config.bleu_every_steps == 0) or at_end


def _evaluation_due(config, step: int, at_end: bool) -> bool:
    return _loss_due(config, step, at_end) or _bleu_due(config, step, at_end)


def _evaluate(run: Run, step: int, at_end: bool) -> None:
    """Dev loss and dev BLEU when due; keeps the parameters with the best BLEU (for the family's
    language models, which do not translate: with the lowest dev perplexity)."""
    config, translates = run.config, run.evaluator.translates
    if _loss_due(config, step, at_end):
        row = {**run.evaluator.dev_loss(run.state.params), "elapsed_s": run.clock()}
        run.writer.write(step, row)
        log.info(
            "step %d: dev loss %.3f ppl %.2f accuracy %.3f",
            step, row["dev_loss"], row["dev_ppl"], row["dev_accuracy"],
        )  # fmt: skip
        if not translates:
            _keep_best(run, step, -float(row["dev_nll"]), {"dev_ppl": float(row["dev_ppl"])})
    if _bleu_due(config, step, at_end, translates):
        row = {**run.evaluator.bleu(run.state.params), "elapsed_s": run.clock()}
        run.writer.write(step, row)
        _keep_best(run, step, row["bleu"], {"bleu": row["bleu"]})


def _keep_best(run: Run, step: int, value: float, meta: dict) -> None:
    """Saves the parameters as ``best/`` when ``value`` (dev BLEU, or minus the dev NLL) beats
    the best so far (higher wins)."""
    if value > run.best_score:
        run.best_score = value
        if step in run.best_mngr.all_steps():  # saved before a restart; the same parameters
            log.info("best checkpoint %d exists already; keeping it", step)
        else:
            checkpoints.save_params(run.best_mngr, step, run.state.params, {**meta, "score": value})


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


def _minutes(start: float) -> float:
    return (time.monotonic() - start) / 60
