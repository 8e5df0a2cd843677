"""A workdir's files: where each lives, and how its configs and tokenizer are written and read.

A workdir holds ``config.json`` (the resolved training config), ``model_config.json`` (the
``TransformerConfig``), the tokenizer (``tokenizer.model``, or an imported Marian tokenizer's
files), ``.lock`` (``workdirs.lock``) and checkpoints (``checkpoints/``, maybe ``best/``,
``averaged/``, ``imported/``: ``workdirs.checkpoints``). This module is the one place that knows
those names; ``train.py`` writes them (via ``training.setup``), and ``workdirs.restore`` reads them
back for decoding.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import jax
import ml_collections

from data import Tokenizer, marian_tokenizer
from model import TransformerConfig
from model.encoder_only import model_vocab_size

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.model"

__all__ = [
    "CONFIG", "MODEL_CONFIG", "TOKENIZER", "check_model_config", "check_tokenizer_copy",
    "config_dict", "copy_tokenizer", "model_config_diff", "read_model_config", "saved_model_field",
    "read_tokenizer", "tokenizer_files", "write_configs", "write_model_config",
]  # fmt: skip


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
    files = tokenizer_files(source)
    if not files:
        raise FileNotFoundError(f"config.init_from: missing tokenizer: {source / TOKENIZER}")
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
    if not tokenizer_files(workdir):
        raise FileNotFoundError(
            f"missing tokenizer: {workdir / TOKENIZER} (was the workdir trained?)"
        )
    config = TransformerConfig.from_dict(json.loads(config_path.read_text()))
    tokenizer = read_tokenizer(workdir)
    # An encoder-only model has one more row than its tokenizer: the mask id.
    if model_vocab_size(config.architecture, tokenizer.vocab_size) != config.vocab_size:
        raise ValueError(
            f"{workdir}'s tokenizer has {tokenizer.vocab_size} tokens but {config_path} says "
            f"vocab_size={config.vocab_size}: tokenizer and model do not match"
        )
    return config, tokenizer


def saved_model_field(workdir: str | Path, name: str):
    """A field of ``WORKDIR/model_config.json`` read before any config is checked (the dtype a
    resumed run keeps, the architecture a converter refuses); None if the file or field is
    absent or unreadable."""
    try:
        saved = json.loads((Path(workdir) / MODEL_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    return TransformerConfig.normalised_dict(saved).get(name)


def read_tokenizer(workdir: str | Path):
    """The tokenizer a workdir holds: ``tokenizer.model`` (trained here) or an imported
    Marian tokenizer (``marian_tokenizer.json`` and its files, see ``data.marian_tokenizer``).

    Raises:
      FileNotFoundError: the workdir has neither.
      DataError: the files are there but unusable.
    """
    workdir = Path(workdir)
    if (workdir / TOKENIZER).exists():
        return Tokenizer.load(workdir / TOKENIZER)
    if (workdir / marian_tokenizer.DESCRIPTOR).exists():
        return marian_tokenizer.MarianTokenizer.load(workdir)
    raise FileNotFoundError(f"missing tokenizer: {workdir / TOKENIZER}")


def tokenizer_files(workdir: str | Path) -> list[Path]:
    """The files of a workdir's tokenizer (empty if it has none), to copy or compare."""
    workdir = Path(workdir)
    if (workdir / TOKENIZER).exists():
        return [workdir / TOKENIZER]
    if (workdir / marian_tokenizer.DESCRIPTOR).exists():
        names = (*marian_tokenizer.FILES, marian_tokenizer.DESCRIPTOR)
        return [workdir / n for n in names]
    return []
