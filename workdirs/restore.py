"""Reading a workdir's model back: ``load`` for decoding, ``restore_params`` for any reader.

Both only read: a damaged checkpoint is skipped (``latest``) or named (an explicit one), never
moved; ``train.py`` sets damaged checkpoints aside when it resumes (``workdirs.checkpoints``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import linen as nn

from model import build_model, init_inputs, make_mesh
from model.sharding import logical_to_sharding
from workdirs import checkpoints
from workdirs.checkpoint_errors import (
    DAMAGED,
    TRANSIENT,
    CheckpointReadError,
    classify,
    describe,
)
from workdirs.files import read_model_config

log = logging.getLogger("workdirs")


def load(workdir: str | Path, which: str | int = "latest", mesh=None):
    """Model, parameters and tokenizer of a workdir; errors name what is missing.

    Returns:
      ``(model, params, tokenizer)``, the parameters placed on ``mesh`` (default: all devices,
      data-parallel).
    """
    workdir = Path(workdir)
    model_cfg, tokenizer = read_model_config(workdir)
    model = build_model(model_cfg)
    mesh = mesh or make_mesh()
    boxed = jax.eval_shape(model.init, jax.random.key(0), *init_inputs(model_cfg))["params"]
    shardings = logical_to_sharding(boxed, mesh)
    # Restored straight into this mesh's shardings, so a checkpoint written on another number
    # of devices (trained on 8 GPUs, translated on 1) loads as well.
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        shardings,
    )
    params, meta, _, step = restore_params(workdir, which, abstract)
    # Logged as decode.py's: this is the line its users have always seen.
    logging.getLogger("decode").info(
        "loaded %s checkpoint of step %s from %s", which, step, workdir
    )
    return model, params, tokenizer


class _Damaged(Exception):
    """Internal: the checkpoint read is damaged (the message says how)."""


def _restore(workdir: Path, which: str | int, abstract) -> tuple[Any, dict]:
    """``checkpoints.load_params``, its errors told apart: ``_Damaged`` for damaged files,
    ``CheckpointReadError`` (one line) for anything else."""
    try:
        return checkpoints.load_params(workdir, which, abstract)
    except Exception as err:  # Orbax's errors for unreadable checkpoints vary
        if classify(err) == DAMAGED:
            why = describe(err)  # TensorStore's lines run to 2,000 characters
            raise _Damaged(why if len(why) <= 160 else why[:159] + "…") from err
        kind, step = checkpoints.resolve(workdir, which)
        cause = "an I/O error that may pass: rerun" if classify(err) == TRANSIENT else ""
        raise CheckpointReadError(
            f"could not read checkpoint {workdir / kind / str(step)} ({describe(err)})"
            + (f"; {cause}" if cause else "")
        ) from None


def restore_params(
    workdir: str | Path, which: str | int = "latest", abstract=None
) -> tuple[Any, dict, str, int]:
    """The parameters of a workdir's checkpoint, for decoding and converting; a reader that
    moves and changes nothing (``train.py`` sets damaged checkpoints aside when it resumes).

    ``latest`` skips damaged checkpoints (truncated, garbled or missing files) for the newest
    readable one, with one warning naming both steps. A damaged checkpoint named explicitly (a
    step, ``best``, ``averaged``, ``imported``) is an error naming the newest readable training
    checkpoint before it, to pass as ``--checkpoint`` instead.

    Returns:
      ``(params, meta, kind, step)``: the checkpoint used is ``WORKDIR/kind/step``.

    Raises:
      FileNotFoundError: there is no such checkpoint.
      CheckpointReadError: it (and, for ``latest``, every earlier one) is damaged, or reading
        failed for another reason; one line.
    """
    workdir = Path(workdir)
    _drop_closed_event_loop_noise()
    kind, step = checkpoints.resolve(workdir, which)
    try:
        params, meta = _restore(workdir, which, abstract)
        return params, meta, kind, step
    except _Damaged as err:
        damaged = [f"{kind}/{step}: {err}"]
    directory = workdir / "checkpoints"
    earlier = sorted(
        ocp.utils.checkpoint_steps(directory) if directory.is_dir() else [], reverse=True
    )
    if kind == "checkpoints":
        earlier = [s for s in earlier if s < step]
    for candidate in earlier:
        try:
            params, meta = _restore(workdir, candidate, abstract)
        except _Damaged as err:
            damaged.append(f"checkpoints/{candidate}: {err}")
            continue
        break
    else:
        candidate = None
    if which == "latest" and candidate is not None:
        log.warning(
            "damaged checkpoint in %s (%s); using step %d, the newest readable one (nothing "
            "in the workdir was changed; train.py sets damaged checkpoints aside)",
            workdir, "; ".join(damaged), candidate,
        )  # fmt: skip
        return params, meta, "checkpoints", candidate
    hint = (
        f"the newest readable earlier checkpoint is step {candidate}: rerun with "
        f"--checkpoint={candidate}"
        if candidate is not None
        else f"no checkpoint in {directory} is readable"
    )
    raise CheckpointReadError(
        f"checkpoint {kind}/{step} of {workdir} is damaged ({damaged[0].split(': ', 1)[1]}); "
        f"nothing in the workdir was changed; {hint}"
    )


def _drop_closed_event_loop_noise() -> None:
    """Keeps a failed read to its one error line: after Orbax gives up on a damaged checkpoint,
    TensorStore's other pending reads call back into the event loop Orbax has closed, and each
    prints a ``RuntimeError: Event loop is closed`` traceback (60 for the tiny model) through
    ``sys.unraisablehook``. Those, and only those, are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loops", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_event_loops = True
    sys.unraisablehook = hook
    # The same reads, when their task is collected before the loop closes, are logged by
    # asyncio as "Task exception was never retrieved" with a traceback: the error was retrieved,
    # by Orbax's first failing read, which is what the user is told.
    logging.getLogger("asyncio").addFilter(
        lambda record: not str(record.msg).startswith("Task exception was never retrieved")
    )


def host_abstract_params(model):
    """ShapeDtypeStructs of the model's params, all on the first CPU (or default) device."""
    inputs = init_inputs(model.config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:
        device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
