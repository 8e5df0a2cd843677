"""Orbax checkpoints in the workdir: save, resume with fallback, average, load for inference.

Layout (one Orbax item per piece of state):

    WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}   the last K, for resuming
    WORKDIR/best/<step>/{params, meta}                            the best by dev BLEU
    WORKDIR/averaged/<step>/{params, meta}                        from `python -m training.average`

``data`` is the input iterator's state and ``meta`` holds the step, the seed and bookkeeping.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
process killed mid-save leaves nothing that looks valid. A checkpoint that fails to restore
anyway (a truncated file, a disk error) is moved aside with a warning and the one before it
is used.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from training.state import TrainState

log = logging.getLogger(__name__)

KINDS = ("checkpoints", "best", "averaged")


def manager(
    workdir: str | Path, kind: str = "checkpoints", *, keep: int = 5, async_save: bool = True
) -> ocp.CheckpointManager:
    """A CheckpointManager for ``WORKDIR/<kind>`` keeping the newest ``keep`` steps."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    items = ("params", "opt_state", "data", "meta") if kind == "checkpoints" else ("params", "meta")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / kind, options=options, item_names=items)


def save(mngr: ocp.CheckpointManager, state: TrainState, data_state: dict, meta: dict) -> None:
    """Starts an (async) save of the whole training state at ``state.step``."""
    step = int(state.step)
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        ),
        force=True,
    )


def save_params(mngr: ocp.CheckpointManager, step: int, params: Any, meta: dict) -> None:
    """Saves parameters only (best / averaged checkpoints), synchronously."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        ),
        force=True,
    )
    mngr.wait_until_finished()


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
    """Moves an unreadable checkpoint out of the manager's directory, keeping it for a look."""
    src = Path(mngr.directory) / str(step)
    dst = Path(mngr.directory).parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0 and src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
    mngr.reload()


def restore_latest(
    mngr: ocp.CheckpointManager, abstract: TrainState
) -> tuple[TrainState, dict, dict] | None:
    """Restores the newest readable checkpoint.

    Args:
      mngr: the ``checkpoints`` manager.
      abstract: ShapeDtypeStructs with shardings for the state (``training.state.abstract_state``).

    Returns:
      ``(state, data_state, meta)``, or None when there is no readable checkpoint.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract.params),
                    opt_state=ocp.args.StandardRestore(abstract.opt_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # any failure to read means: do not trust this checkpoint
            log.warning(
                "checkpoint %s/%d is unreadable (%s: %s); moving it to corrupt_checkpoints/ and "
                "trying the previous one",
                mngr.directory,
                step,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
            _set_aside(mngr, step)
            continue
        meta = dict(restored["meta"])
        if meta.get("step") != step:
            log.warning("checkpoint %d has meta step %s; using it anyway", step, meta.get("step"))
        state = TrainState(
            step=jax.numpy.asarray(step, jax.numpy.int32),
            params=restored["params"],
            opt_state=restored["opt_state"],
        )
        return state, dict(restored["data"]), meta
    return None


def resolve(workdir: str | Path, which: str | int = "latest") -> tuple[str, int]:
    """Which checkpoint ``which`` names: ``latest``, ``best``, ``averaged`` or a step number.

    Returns:
      ``(kind, step)``.

    Raises:
      FileNotFoundError: naming the directory searched and what it holds.
    """
    workdir = Path(workdir)
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    kind = "checkpoints" if which == "latest" or isinstance(which, int) else which
    if kind not in KINDS:
        raise ValueError(
            f"--checkpoint must be latest, best, averaged or a step number, got {which!r}"
        )
    directory = workdir / kind
    steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []
    if not steps:
        raise FileNotFoundError(f"no {kind} checkpoint in {directory} (is --workdir right?)")
    if isinstance(which, int):
        if which not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {which} in {directory}; available steps: {steps}"
            )
        return kind, which
    return kind, steps[-1]


def load_params(workdir: str | Path, which: str | int = "latest", abstract_params=None):
    """The parameters of one checkpoint, for decoding or averaging.

    Args:
      workdir: the training workdir.
      which: ``latest``, ``best``, ``averaged`` or a step number.
      abstract_params: optional ShapeDtypeStruct tree (with shardings) to restore into.

    Returns:
      ``(params, meta)``.
    """
    kind, step = resolve(workdir, which)
    path = Path(workdir).absolute() / kind / str(step)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            path,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                meta=ocp.args.JsonRestore(),
            ),
        )
    return restored["params"], dict(restored["meta"])
