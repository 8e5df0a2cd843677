"""Orbax checkpoints in the workdir: save, resume with fallback, average, load for inference.

Layout (one Orbax item per piece of state):

    WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}   the last K, for resuming
    WORKDIR/best/<step>/{params, meta}                            the best by dev BLEU
    WORKDIR/averaged/<step>/{params, meta}                        from `python -m training.average`
    WORKDIR/imported/0/{params, meta}                             written by convert.py

``data`` is the input iterator's state and ``meta`` holds the step, the seed, the configuration
and bookkeeping. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a process killed mid-save leaves nothing that looks valid (and the next start
deletes such leftovers, ``cleanup_tmp_directories``).

Resuming (``restore_latest``) tells apart what can go wrong (``workdirs.checkpoint_errors``):

- a damaged checkpoint (truncated or garbled files) is moved to ``corrupt_checkpoints/`` with a
  warning and the one before it is used;
- a readable checkpoint that does not fit the configuration (another optimizer, another batch
  layout) stops the run with ``CheckpointMismatchError`` naming the differences; nothing moves;
- a transient read error is retried with a growing delay, then stops the run with
  ``CheckpointReadError``; so does any error not recognised as damage. Nothing moves.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from workdirs.checkpoint_errors import (  # noqa: F401  (the errors are this module's API too)
    DAMAGED,
    TRANSIENT,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointReadError,
    CheckpointWriteError,
    classify,
    config_differences,
    describe,
    tree_differences,
)

log = logging.getLogger(__name__)

# "imported": the parameters convert.py writes into a new workdir (``imported/0``).
KINDS = ("checkpoints", "best", "averaged", "imported")
# Seconds to wait before each new try of a read that failed with a transient error.
RETRY_DELAYS_S = (1.0, 4.0, 15.0)


def manager(
    workdir: str | Path, kind: str = "checkpoints", *, keep: int = 5, async_save: bool = True
) -> ocp.CheckpointManager:
    """A CheckpointManager for ``WORKDIR/<kind>`` keeping the newest ``keep`` steps."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    # Handlers declared up front, so metadata can be read before anything is restored.
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if kind == "checkpoints":
        handlers |= {
            "opt_state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        }
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,  # half-written saves of a killed run
    )
    return ocp.CheckpointManager(
        Path(workdir).absolute() / kind, options=options, item_handlers=handlers
    )


def _write_error(
    mngr: ocp.CheckpointManager, what: str, err: BaseException
) -> CheckpointWriteError:
    steps = sorted(mngr.all_steps())
    return CheckpointWriteError(
        f"{what} in {mngr.directory} failed ({describe(err)}); the complete checkpoints there "
        f"(steps {steps}) are intact and a rerun resumes from the newest once the cause (disk "
        "space, permissions, the file system) is fixed"
    )


def save(mngr: ocp.CheckpointManager, state, data_state: dict, meta: dict) -> None:
    """Starts an (async) save of the whole training state at ``state.step``.

    Raises:
      CheckpointWriteError: this save, or the previous (asynchronous) one, failed.
    """
    step = int(state.step)
    try:
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
    except Exception as err:  # Orbax re-raises the previous async save's error here too
        raise _write_error(mngr, f"saving checkpoint {step}", err) from err


def finish(mngr: ocp.CheckpointManager) -> None:
    """Waits for pending saves; raises ``CheckpointWriteError`` if one failed."""
    try:
        mngr.wait_until_finished()
    except Exception as err:
        raise _write_error(mngr, "finishing a checkpoint save", err) from err


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


class _Damaged(Exception):
    """Internal: the checkpoint being read is damaged (the cause says how)."""


def _read(fn: Callable[[], Any], where: str) -> Any:
    """Runs one read of checkpoint ``where``, retrying transient errors.

    Raises:
      _Damaged: the files are damaged.
      CheckpointReadError: transient errors outlasted the retries, or the error is unknown.
    """
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn()
        except Exception as err:
            kind = classify(err)
            if kind == DAMAGED:
                raise _Damaged(describe(err)) from err
            if kind == TRANSIENT and delay is not None:
                log.warning("reading %s failed (%s); retrying in %g s", where, describe(err), delay)
                time.sleep(delay)
                continue
            if kind == TRANSIENT:
                raise CheckpointReadError(
                    f"could not read checkpoint {where} in {len(RETRY_DELAYS_S) + 1} tries "
                    f"({describe(err)}); nothing was moved or deleted: check the disk or file "
                    "system, then rerun"
                ) from err
            raise CheckpointReadError(
                f"could not read checkpoint {where} ({describe(err)}); this error is not one "
                "that damaged files cause, so nothing was moved or deleted. If the checkpoint "
                f"is damaged all the same, move {where} elsewhere and rerun to resume from the "
                "one before it"
            ) from err
    raise AssertionError("unreachable")


def _meta(mngr: ocp.CheckpointManager, step: int, where: str) -> dict:
    restored = _read(
        lambda: mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())), where
    )
    return dict(restored["meta"])


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
    """Moves a damaged checkpoint out of the manager's directory, keeping it for a look."""
    src = Path(mngr.directory) / str(step)
    dst = Path(mngr.directory).parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0 and src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        log.warning("moved %s to %s", src, dst)
    mngr.reload()


def _check_fits(
    mngr: ocp.CheckpointManager,
    step: int,
    abstract,
    meta: dict,
    config: dict | None,
    batch: dict | None,
) -> None:
    """Raises CheckpointMismatchError if checkpoint ``step`` cannot continue this run."""
    where = f"{mngr.directory}/{step}"
    metadata = _read(lambda: mngr.item_metadata(step), where)
    problems = []
    for name in ("params", "opt_state"):
        saved = metadata[name] if name in metadata.keys() else None
        if saved is None:
            raise _Damaged(f"item {name!r} is missing")
        problems += [f"{name}: {line}" for line in tree_differences(saved, getattr(abstract, name))]
    saved_batch = meta.get("batch")
    if isinstance(saved_batch, dict) and "max_len" in saved_batch:  # the name until row_length
        saved_batch = {("row_length" if k == "max_len" else k): v for k, v in saved_batch.items()}
    if batch is not None and saved_batch not in (None, batch):
        problems.append(
            f"batches: saved with {meta['batch']}, now {batch} (its input position would "
            "point at other examples)"
        )
    if not problems:
        return
    changed = config_differences(meta.get("config"), config or {})
    fields = f"; configuration changes since it was saved: {', '.join(changed)}" if changed else ""
    workdir = Path(mngr.directory).parent
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit this configuration: {'; '.join(problems)}{fields}. "
        "Nothing was moved or deleted. Rerun with the configuration it was saved with "
        f"({workdir}/config.json), or start a new --workdir from its parameters with a fresh "
        f"optimizer: --config.init_from={workdir}"
    )


def restore_latest(
    mngr: ocp.CheckpointManager,
    abstract,
    *,
    config: dict | None = None,
    batch: dict | None = None,
) -> tuple[Any, dict, dict] | None:
    """Restores the newest usable checkpoint.

    Args:
      mngr: the ``checkpoints`` manager.
      abstract: ShapeDtypeStructs with shardings for the state (``training.state.abstract_state``).
      config: the current configuration as a plain dict, to name the fields that changed.
      batch: the current batch layout (``meta['batch']`` of new checkpoints); a checkpoint
        saved with another one does not fit.

    Returns:
      ``(state, data_state, meta)``, or None when there is no checkpoint (or only damaged ones,
      all moved to ``corrupt_checkpoints/``).

    Raises:
      CheckpointMismatchError: the newest readable checkpoint does not fit the configuration.
      CheckpointReadError: reading failed, not (known to be) because of damage.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        where = f"{mngr.directory}/{step}"
        try:
            meta = _meta(mngr, step, where)
            _check_fits(mngr, step, abstract, meta, config, batch)
            restored = _read(
                lambda step=step: mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract.params),
                        opt_state=ocp.args.StandardRestore(abstract.opt_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                ),
                where,
            )
        except _Damaged as err:
            log.warning(
                "checkpoint %s is damaged (%s); moving it to corrupt_checkpoints/ and trying the "
                "previous one",
                where,
                err,
            )
            _set_aside(mngr, step)
            continue
        if meta.get("step") != step:
            log.warning("checkpoint %d has meta step %s; using it anyway", step, meta.get("step"))
        if config is not None and (changed := config_differences(meta.get("config"), config)):
            log.warning("resuming from step %d with changed configuration: %s", step, changed)
        # The training state's own type (``training.state.TrainState``), which this lower
        # layer does not import: the abstract state has its fields.
        state = abstract.replace(
            step=jax.numpy.asarray(step, jax.numpy.int32),
            params=restored["params"],
            opt_state=restored["opt_state"],
        )
        return state, dict(restored["data"]), meta
    return None


def best_score(mngr: ocp.CheckpointManager) -> float | None:
    """The score of the newest ``best`` checkpoint (its dev BLEU, or minus the dev NLL of a
    language model), or None if there is none (or unreadable).

    A run stopped right after saving a new best checkpoint has not yet recorded its BLEU in a
    regular checkpoint; this is where a resumed run learns it.
    """
    steps = mngr.all_steps()
    if not steps:
        return None
    where = f"{mngr.directory}/{max(steps)}"
    try:
        meta = _meta(mngr, max(steps), where)
        return float(meta["score"] if "score" in meta else meta["bleu"])
    except (_Damaged, CheckpointReadError, KeyError, TypeError, ValueError) as err:
        log.warning("cannot read the score of best checkpoint %s (%s)", where, describe(err))
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
            f"--checkpoint must be latest, best, averaged, imported or a step number, got {which!r}"
        )
    directory = workdir / kind
    steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []
    if not steps and which == "latest" and (workdir / "imported").is_dir():
        # A workdir convert.py wrote: its imported parameters until training saves its own.
        kind, directory = "imported", workdir / "imported"
        steps = sorted(ocp.utils.checkpoint_steps(directory))
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
