"""The project's own workdir as a conversion format: ``read_workdir`` turns one checkpoint of a
workdir into a ``TransformerBundle`` and ``write_workdir`` writes a bundle as a workdir that
decode.py, plots.py and train.py's ``init_from`` use.

``read_workdir`` restores the parameters onto one host device whatever the mesh they were
saved from, so a workdir trained on 8 accelerators converts on a laptop.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from data import DataError
from interop.bundle import ConversionError, TransformerBundle, check_new_output, staged_directory
from model import build_model, init_inputs
from workdirs import checkpoints
from workdirs.checkpoint_errors import CheckpointReadError
from workdirs.files import TOKENIZER, read_model_config, saved_model_field, write_model_config
from workdirs.restore import host_abstract_params, restore_params

log = logging.getLogger("interop")


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
    tokenizer_path = workdir / TOKENIZER  # None for an imported (Marian) tokenizer
    tokenizer_path = tokenizer_path if tokenizer_path.exists() else None
    try:
        # An encoder-only model's tokenizer lacks its mask id: refused before it is read.
        if saved_model_field(workdir, "architecture") == "encoder_only":
            raise ValueError(
                "it holds an encoder-only (masked LM) model, which cannot be converted"
            )
        config, tokenizer = read_model_config(workdir)
        kind, step = checkpoints.resolve(workdir, which)
    except (FileNotFoundError, ValueError, DataError) as err:
        raise ConversionError(f"cannot read workdir {workdir}: {err}") from None
    try:
        params, _, kind, step = restore_params(
            workdir, which, host_abstract_params(build_model(config))
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
            shutil.copyfile(bundle.tokenizer_path, stage / TOKENIZER)
        else:
            raise ConversionError(f"{bundle.description}: the tokenizer's model file is unknown")
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), bundle.params)
        mngr = checkpoints.manager(stage, "imported", keep=1, async_save=False)
        checkpoints.save_params(mngr, 0, params, {"imported_from": bundle.description})
        mngr.close()
    log.info("wrote workdir %s from %s", output, bundle.description)
    return Path(output)
