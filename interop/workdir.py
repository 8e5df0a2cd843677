"""The one module that reads and writes a training workdir.

A workdir holds ``config.json`` (the resolved training config), ``model_config.json`` (the
``TransformerConfig``), the tokenizer (``tokenizer.model``, or an imported Marian tokenizer's
files) and checkpoints (``checkpoints/``, maybe ``best/``, ``averaged/``, ``imported/``).
``train.py`` writes one (``write_configs``, ``copy_tokenizer``, ``check_model_config``, via
``training.setup``); ``decode.py``, ``plots.py`` and the benchmarks read one (``load``); and
``convert.py`` reads and writes one as a ``TransformerBundle`` (``read_workdir``,
``write_workdir``). Every workdir model is built by ``build_model``.

``read_workdir`` restores the parameters onto one host device whatever the mesh they were
saved from, so a workdir trained on 8 accelerators converts on a laptop; ``load`` restores them
onto a mesh, for translating.
"""

from __future__ import annotations

import filecmp
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

import model as model_lib
from data import DataError, Tokenizer
from data.tokenizer import workdir_tokenizer, workdir_tokenizer_files
from interop.common import ConversionError, TransformerBundle, check_new_output, staged_directory
from model import TransformerConfig, init_inputs, make_mesh
from model.encoder_only import model_vocab_size
from model.sharding import logical_to_sharding
from training import checkpoints
from training.checkpoint_checks import DAMAGED, TRANSIENT, CheckpointReadError, classify, describe

log = logging.getLogger("interop")

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"

# The tokenizer of a workdir: read and listed by data.tokenizer, re-exported so that callers
# find every workdir file here.
__all__ = [
    "build_model", "check_model_config", "check_tokenizer_copy", "config_dict", "copy_tokenizer",
    "load", "model_config_diff", "read_model_config", "read_workdir", "workdir_tokenizer",
    "workdir_tokenizer_files", "write_configs", "write_model_config", "write_workdir",
]  # fmt: skip


def build_model(cfg: TransformerConfig):
    """The model a workdir's ``model_config.json`` describes (every workdir model is built here):
    ``Transformer``, ``DecoderOnlyLM`` or ``EncoderOnly`` by ``cfg.architecture``."""
    return model_lib.build_model(cfg)


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """The configuration as plain JSON values (saved in every checkpoint's meta)."""
    return json.loads(config.to_json_best_effort())


def write_model_config(directory: Path, model_cfg: TransformerConfig) -> None:
    """Writes ``directory/model_config.json``."""
    (directory / MODEL_CONFIG).write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")


def write_configs(
    workdir: Path, config: ml_collections.ConfigDict, model_cfg: TransformerConfig
) -> None:
    """Saves the resolved configs (process 0)."""
    if jax.process_index() == 0:
        (workdir / CONFIG).write_text(config.to_json_best_effort(indent=2) + "\n")
        write_model_config(workdir, model_cfg)


def model_config_diff(path: Path, model_cfg: TransformerConfig) -> dict:
    """``{field: (saved, new)}`` for each field on which the saved config at ``path`` and
    ``model_cfg`` differ (None where one lacks it); empty when they describe the same model."""
    saved, new = (
        TransformerConfig.normalised_dict(json.loads(path.read_text())),
        model_cfg.to_dict(),
    )
    diff = {k: (saved.get(k), v) for k, v in new.items() if saved.get(k) != v}
    return diff | {k: (saved[k], None) for k in saved.keys() - new.keys()}


def check_model_config(workdir: Path, model_cfg: TransformerConfig) -> None:
    """Refuses to resume a workdir whose ``model_config.json`` describes another model."""
    path = workdir / MODEL_CONFIG
    if not path.exists():
        return
    diff = model_config_diff(path, model_cfg)
    if diff:
        raise ValueError(
            f"{path} describes a different model than this config (field: (saved, new)): "
            f"{diff}; use a new --workdir or the original config"
        )


def check_tokenizer_copy(source: Path, workdir: Path) -> list[Path]:
    """The source workdir's tokenizer files, which ``copy_tokenizer`` would put in ``workdir``.

    Raises:
      FileNotFoundError: the source has no tokenizer.
      ValueError: ``workdir`` holds different ones already.
    """
    files = workdir_tokenizer_files(source)
    if not files:
        raise FileNotFoundError(
            f"config.init_from: missing tokenizer: {source / 'tokenizer.model'}"
        )
    for src in files:
        dst = workdir / src.name
        if dst.exists() and not filecmp.cmp(src, dst, shallow=False):
            raise ValueError(
                f"{dst} differs from {src}: fine-tuning needs the tokenizer the "
                "parameters were trained with; use a new --workdir"
            )
    return files


def copy_tokenizer(source: Path, workdir: Path) -> None:
    """Puts the source workdir's tokenizer files (``tokenizer.model``, or an imported Marian
    tokenizer's) in the new workdir, refusing different ones already there."""
    files = check_tokenizer_copy(source, workdir)
    if jax.process_index() == 0:
        # The descriptor (or tokenizer.model) last, so a crash never leaves a loadable half.
        for src in files:
            dst = workdir / src.name
            if not dst.exists():
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copyfile(src, tmp)
                tmp.replace(dst)


def read_model_config(workdir: Path) -> tuple[TransformerConfig, Tokenizer]:
    """A workdir's model config and tokenizer, checked against each other.

    Raises:
      FileNotFoundError: the workdir, its ``model_config.json`` or ``tokenizer.model`` is missing.
      ValueError: the tokenizer's size is not the model's vocabulary size.
    """
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    config_path = workdir / MODEL_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"missing model config: {config_path} (was the workdir trained?)")
    if not workdir_tokenizer_files(workdir):
        raise FileNotFoundError(
            f"missing tokenizer: {workdir / 'tokenizer.model'} (was the workdir trained?)"
        )
    config = TransformerConfig.from_dict(json.loads(config_path.read_text()))
    tokenizer = workdir_tokenizer(workdir)
    # An encoder-only model has one more row than its tokenizer: the mask id.
    if model_vocab_size(config.architecture, tokenizer.vocab_size) != config.vocab_size:
        raise ValueError(
            f"{workdir}'s tokenizer has {tokenizer.vocab_size} tokens but {config_path} says "
            f"vocab_size={config.vocab_size}: tokenizer and model do not match"
        )
    return config, tokenizer


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


def _saved_architecture(workdir: Path) -> str | None:
    """``model_config.json``'s architecture, read before the config is checked; None if absent."""
    try:
        saved = json.loads((workdir / MODEL_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    return TransformerConfig.normalised_dict(saved).get("architecture")


def _host_abstract_params(model):
    """ShapeDtypeStructs of the model's params, all on the first CPU (or default) device."""
    inputs = init_inputs(model.config)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:
        device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def read_workdir(workdir: str | Path, checkpoint: str | int | None = None) -> TransformerBundle:
    """The model of a workdir at one checkpoint.

    Args:
      workdir: a directory written by ``train.py`` (``model_config.json``, ``tokenizer.model``,
        ``checkpoints/``, maybe ``best/`` and ``averaged/``).
      checkpoint: latest (default), best, averaged or a step number.

    Returns:
      The bundle; its parameters are float32 NumPy arrays.

    Raises:
      ConversionError: the workdir, its config, tokenizer or the checkpoint is missing or they
        do not fit together (one-line message naming the path).
    """
    workdir, which = Path(workdir), "latest" if checkpoint is None else str(checkpoint)
    tokenizer_path = workdir / "tokenizer.model"  # None for an imported (Marian) tokenizer
    tokenizer_path = tokenizer_path if tokenizer_path.exists() else None
    try:
        if _saved_architecture(workdir) == "encoder_only":  # its tokenizer lacks the mask id
            raise ValueError(
                "it holds an encoder-only (masked LM) model, which cannot be converted"
            )
        config, tokenizer = read_model_config(workdir)
        kind, step = checkpoints.resolve(workdir, which)
    except (FileNotFoundError, ValueError, DataError) as err:
        raise ConversionError(f"cannot read workdir {workdir}: {err}") from None
    try:
        params, _, kind, step = restore_params(
            workdir, which, _host_abstract_params(build_model(config))
        )
    except CheckpointReadError as err:  # one line already (a damaged checkpoint included)
        raise ConversionError(str(err)) from None
    except Exception as err:  # Orbax's errors for unreadable or mismatched checkpoints vary.
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConversionError(
            f"cannot read checkpoint {kind}/{step} of {workdir}: {type(err).__name__}: {first}"
        ) from None
    return TransformerBundle.from_params(
        config,
        params,
        tokenizer,
        tokenizer_path=tokenizer_path,
        description=f"{workdir} ({kind}/{step})",
    )


def _check_params(bundle: TransformerBundle) -> None:
    """Refuses parameters that are not the tree ``build_model(bundle.config)`` has."""
    model = build_model(bundle.config)
    inputs = init_inputs(bundle.config)
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree.leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree.leaves_with_path(bundle.params)}
    if want != have:
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        raise ConversionError(
            f"{bundle.description}: the parameters do not fit the model config (missing "
            f"{missing[:3]}, unexpected {extra[:3]}, other shapes {shapes[:3]})"
        )


def check_output(path: str | Path, force: bool) -> None:
    check_new_output(path, force)


def write_workdir(bundle: TransformerBundle, output: str | Path, *, force: bool = False) -> Path:
    """Writes ``bundle`` as a workdir that decode.py, plots.py and train.py's ``init_from`` use.

    Layout: ``model_config.json``, the tokenizer (``tokenizer.model``, or an imported Marian
    tokenizer's files) and the parameters as checkpoint ``imported/0`` (which ``latest``
    names while the workdir has no training checkpoint).

    Raises:
      ConversionError: ``output`` exists (without ``force``) or the parameters do not fit.
    """
    from data.marian_tokenizer import MarianTokenizer

    _check_params(bundle)
    with staged_directory(output, force) as stage:
        write_model_config(stage, bundle.config)
        if isinstance(bundle.tokenizer, MarianTokenizer):
            bundle.tokenizer.save(stage)
        elif bundle.tokenizer_path is not None:
            shutil.copyfile(bundle.tokenizer_path, stage / "tokenizer.model")
        else:
            raise ConversionError(f"{bundle.description}: the tokenizer's model file is unknown")
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), bundle.params)
        mngr = checkpoints.manager(stage, "imported", keep=1, async_save=False)
        checkpoints.save_params(mngr, 0, params, {"imported_from": bundle.description})
        mngr.close()
    log.info("wrote workdir %s from %s", output, bundle.description)
    return Path(output)
