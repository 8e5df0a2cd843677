"""Everything a training run needs before its first step, in one `Run`.

`setup` trains (or copies, or loads) the tokenizer, builds the model, mesh, optimizer and
compiled steps, and resumes (or starts) the training state from the workdir; the loop itself
(`training.loop`) only consumes what it built. Everything that can refuse a run was checked
before (`training.config_checks`, which also opened the data), and the caller holds the
workdir's lock (`workdirs.lock`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import data
from model import build_model, make_mesh
from training import budget, config_checks, evaluation, resume
from training.metrics import MetricsWriter, Stopwatch
from training.state import OptimizerConfig, make_optimizer, state_shardings
from training.step import jit_train_step, make_eval_step, train_flops_per_step
from workdirs import checkpoints
from workdirs import files as workdir_files

# Below any dev BLEU and any minus-NLL: the first evaluation always makes a best checkpoint.
NO_SCORE = -1.0e30

log = logging.getLogger("train")


@dataclasses.dataclass
class Run:
    """Everything the training loop works with, built by ``setup``."""

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
    best_score: float  # the best checkpoint's dev BLEU, or minus its dev NLL (LMs)
    batch: dict  # the batch layout, saved with each checkpoint
    plan: budget.Plan  # the last step and the schedule numbers that depend on it
    measure: bool  # True: plan is provisional until the first steps are timed (train_minutes)
    started: float = dataclasses.field(default_factory=time.monotonic)  # train_minutes counts


def setup(config: ml_collections.ConfigDict, workdir: Path, start: config_checks.Start) -> Run:
    """Tokenizer, model, mesh, optimizer, compiled steps; resumes from ``workdir``.

    ``start`` is what ``config_checks.check_start`` found (the data opened, the model config);
    the caller has created and locked the workdir.
    """
    train_pairs, dev_pairs = start.train_pairs, start.dev_pairs
    if start.fine_tune:
        # Fine-tuning: parameters only make sense with the tokenizer they were trained with.
        workdir_files.copy_tokenizer(start.source, workdir)
    # One process trains it; the others load the same file.
    if jax.process_index() == 0 and not workdir_files.tokenizer_files(workdir):
        data.train_tokenizer(
            train_pairs,
            workdir / workdir_files.TOKENIZER,
            vocab_size=config.vocab_size,
            seed=config.seed,
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer written")
    tokenizer = workdir_files.read_tokenizer(workdir)
    if tokenizer.vocab_size != start.vocab_size:  # SentencePiece makes exactly vocab_size pieces
        raise data.DataError(
            f"{workdir}'s tokenizer has {tokenizer.vocab_size} pieces, expected {start.vocab_size}"
        )
    model_cfg = start.model_cfg
    model = build_model(model_cfg)

    mesh = make_mesh(**config.mesh)
    rows, batch = _batch_layout(config, train_pairs, tokenizer, mesh)
    dataset = data.train_dataset(
        train_pairs,
        tokenizer,
        row_length=config.row_length,
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
    workdir_files.write_configs(workdir, config, model_cfg)
    # A run stopped right after a new best checkpoint has not yet recorded its BLEU elsewhere.
    saved = meta.get("best_score", meta.get("best_bleu", NO_SCORE))
    best_score = max(saved, checkpoints.best_score(best_mngr) or NO_SCORE)

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
    return Run(
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
        flops=train_flops_per_step(model_cfg, rows * config.grad_accum_steps, config.row_length),
        best_score=best_score,
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
        train_pairs,
        tokenizer,
        row_length=config.row_length,
        overlong=config.overlong,
        seed=config.seed,
    )
    rows = data.rows_per_step(
        config.tokens_per_step, config.row_length, shards, fill=fill, micro_batches=accum
    )
    if rows % jax.process_count():
        raise ValueError(
            f"{rows} rows per micro-batch do not split over {jax.process_count()} hosts"
        )
    real = accum * rows * config.row_length * fill
    log.info(
        "batches: %d x %d rows of %d per step, packed %.1f%% full: about %s real tokens per "
        "side (tokens_per_step=%s)",
        accum, rows, config.row_length, 100 * fill, f"{real:,.0f}", f"{config.tokens_per_step:,}",
    )  # fmt: skip
    if abs(real / config.tokens_per_step - 1) > 0.1:
        log.warning(
            "the nearest batch layout holds %.0f%% of tokens_per_step: a step's rows are a "
            "multiple of %d (devices x micro-batches) of about %.0f tokens each",
            100 * real / config.tokens_per_step, shards * accum, config.row_length * fill,
        )  # fmt: skip
    layout = {"rows": rows, "micro_batches": accum, "row_length": config.row_length}
    return rows, layout


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
