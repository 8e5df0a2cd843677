"""What every reader and writer shares: the in-memory model, the error type, atomic output.

A reader (``interop.workdir_format``) turns some on-disk model into a ``TransformerBundle``: the
project's ``TransformerConfig``, its parameters as NumPy arrays in the Flax layout, and the
shared SentencePiece tokenizer. A writer (``interop.ctranslate2``) turns a bundle into some
other format's directory, staged beside the destination and renamed into place only when
complete (``staged_directory``), so a failed export never leaves a directory that looks valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data.tokenizer import Tokenizer

if TYPE_CHECKING:  # The model package pulls in JAX; readers import it when they need it.
    from model import TransformerConfig

log = logging.getLogger("interop")


class ConversionError(Exception):
    """Bad input for a conversion: the message is one line saying what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class TransformerBundle:
    """A model of this project, held in host memory.

    Attributes:
      config: the model's hyper-parameters.
      params: the Flax ``params`` tree (``{'embed': {'embedding': [V, D]}, 'encoder_layers_0':
        {...}, ...}``) with NumPy float32 leaves, whatever dtype they were stored in.
      tokenizer: the SentencePiece tokenizer shared by source and target.
      tokenizer_path: the tokenizer's model file (writers may copy it), or None.
      description: where the model came from, for logs (e.g. ``runs/x, latest checkpoint``).
    """

    config: TransformerConfig
    params: dict[str, Any]
    tokenizer: Tokenizer
    tokenizer_path: Path | None = None
    description: str = "model"

    @classmethod
    def from_params(
        cls,
        config: TransformerConfig,
        params: Any,
        tokenizer: Tokenizer,
        *,
        tokenizer_path: str | Path | None = None,
        description: str = "model",
    ) -> TransformerBundle:
        """A bundle from parameters in any form (device arrays, boxed, bfloat16).

        Args:
          config: the model's configuration; its vocabulary must be the tokenizer's.
          params: the ``params`` tree (or ``{'params': tree}`` as ``model.init`` returns).
          tokenizer: the shared tokenizer.
          tokenizer_path: its model file, if any.
          description: where the model came from.

        Raises:
          ConversionError: the tokenizer and the model's vocabulary differ in size.
        """
        import jax
        from flax import linen as nn

        params = nn.unbox(params)
        if set(params) == {"params"}:
            params = params["params"]
        if tokenizer.vocab_size != config.vocab_size:
            raise ConversionError(
                f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                f"{config.vocab_size}: they do not belong together"
            )
        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32), params)
        path = None if tokenizer_path is None else Path(tokenizer_path)
        return cls(config, host, tokenizer, path, description)

    def pieces(self) -> list[str]:
        """The vocabulary: the SentencePiece piece of every id, ``[V]`` strings."""
        return [self.tokenizer.id_to_piece(i) for i in range(self.tokenizer.vocab_size)]


def check_new_output(output: str | Path, force: bool) -> Path:
    """Refuses an existing ``output`` unless ``force``; returns it as a Path.

    Raises:
      ConversionError: it exists and ``force`` is False, or its parent is not a directory.
    """
    output = Path(output)
    if output.exists() and not force:
        raise ConversionError(f"output {output} already exists; pass --force to replace it")
    parent = output.absolute().parent
    if not parent.is_dir():
        raise ConversionError(f"cannot write {output}: directory {parent} does not exist")
    return output


@contextlib.contextmanager
def staged_directory(output: str | Path, force: bool) -> Iterator[Path]:
    """A fresh temporary directory beside ``output`` that becomes ``output`` on success.

    The body writes into the yielded directory. If it raises, the directory is removed and
    ``output`` is untouched; if it returns, an existing ``output`` (allowed only with ``force``,
    and logged) is replaced by renames within the same parent directory.

    Raises:
      ConversionError: ``output`` exists and ``force`` is False.
    """
    output = check_new_output(output, force)
    stage = output.with_name(f".{output.name}.partial-{os.getpid()}")
    _remove(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        _remove(stage)
        raise
    old = None
    if output.exists() or output.is_symlink():
        log.warning("replacing the existing %s (--force)", output)
        old = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        _remove(old)
        os.replace(output, old)
    os.replace(stage, output)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
