"""Reads a training workdir (model config, tokenizer, one checkpoint) into a TransformerBundle,
and writes a bundle (an imported model) as a workdir.

The pieces are the project's own (``TransformerConfig.from_dict``, ``Tokenizer.load``,
``training.checkpoints.load_params``), with ``decode.load``'s checks and messages. Unlike
``decode.load``, the parameters are restored onto one host device whatever the mesh they were
saved from, so a workdir trained on 8 accelerators converts on a laptop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from data import DataError
from interop.common import ConversionError, TransformerBundle, check_new_output, staged_directory
from training import checkpoints

log = logging.getLogger("interop")


def _host_abstract_params(model):
    """ShapeDtypeStructs of the model's params, all on the first CPU (or default) device."""
    import jax
    from flax import linen as nn

    ids = jax.numpy.ones((1, 8), jax.numpy.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids))["params"]
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
    from decode import read_model_config  # JAX: only when a workdir is read.
    from model import Transformer

    workdir, which = Path(workdir), "latest" if checkpoint is None else str(checkpoint)
    tokenizer_path = workdir / "tokenizer.model"  # None for an imported (Marian) tokenizer
    tokenizer_path = tokenizer_path if tokenizer_path.exists() else None
    try:
        config, tokenizer = read_model_config(workdir)
        kind, step = checkpoints.resolve(workdir, which)
    except (FileNotFoundError, ValueError, DataError) as err:
        raise ConversionError(f"cannot read workdir {workdir}: {err}") from None
    try:
        params, _ = checkpoints.load_params(
            workdir, which, _host_abstract_params(Transformer(config))
        )
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
    """Refuses parameters that are not the tree ``Transformer(bundle.config)`` has."""
    import jax
    from flax import linen as nn

    from model import Transformer

    ids = jax.numpy.ones((1, 8), jax.numpy.int32)
    model = Transformer(bundle.config)
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids))["params"]
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
    import shutil

    import jax

    from data.marian_tokenizer import MarianTokenizer

    _check_params(bundle)
    with staged_directory(output, force) as stage:
        config = json.dumps(bundle.config.to_dict(), indent=2) + "\n"
        (stage / "model_config.json").write_text(config)
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
