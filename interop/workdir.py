"""Reads a training workdir (model config, tokenizer, one checkpoint) into a TransformerBundle.

The pieces are the project's own (``TransformerConfig.from_dict``, ``Tokenizer.load``,
``training.checkpoints.load_params``), with ``decode.load``'s checks and messages. Unlike
``decode.load``, the parameters are restored onto one host device whatever the mesh they were
saved from, so a workdir trained on 8 accelerators converts on a laptop.
"""

from __future__ import annotations

from pathlib import Path

from data import DataError
from interop.common import ConversionError, TransformerBundle
from training import checkpoints


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
    tokenizer_path = workdir / "tokenizer.model"
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
