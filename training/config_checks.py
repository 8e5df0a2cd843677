"""Every check ``train.py`` makes before it writes anything, so that bad input leaves no trace.

``training.loop.train_and_evaluate`` runs them in this order, all before the workdir is created
or locked (``workdirs.lock``) and before the tokenizer is trained:

- ``check_config``: each field on its own (types and ranges, ``train_minutes`` included); the
  first thing a run does, in microseconds.
- ``check_start``: the config against the world: the workdir path (a directory that is
  writable, or one that can be created), ``init_from``'s source (its form, model, tokenizer and
  checkpoint), the model the config describes (built as a dry run from the preset and the
  overrides with the tokenizer's size), ``row_length`` against its ``max_positions``, an
  existing workdir's ``model_config.json`` and tokenizer, and last, as the slowest, the data
  files (opened). What it opened and worked out comes back as a ``Start`` for
  ``training.setup``, which does none of it again.

Each failure is a ``ValueError``, ``FileNotFoundError`` or ``data.DataError`` with a one-line
message naming the field, file or value and what was expected (``train.py`` prints it as one
ERROR line and exits with status 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections

import data
from data.tokenizer import PAD_ID, UNK_ID, trained_vocab_size
from model import TransformerConfig
from training import resume
from training.state import model_config
from workdirs import checkpoints
from workdirs import files as workdir_files

# The tokenizer's reserved ids (pad, eos, bos, unk) and at least a dozen pieces of text.
MIN_VOCAB_SIZE = max(PAD_ID, UNK_ID) + 1 + 12

# field: (smallest value, what the field means). Integers; a field a config lacks is skipped.
_INTEGERS = {
    "num_train_steps": (1, "the last step; with train_minutes > 0 a cap"),
    "warmup_steps": (0, "the steps of rising learning rate"),
    "cooldown_steps": (0, "the steps of the final linear cooldown; 0: none"),
    "tokens_per_step": (1, "tokens per side in one optimizer step"),
    "grad_accum_steps": (1, "micro-batches per step"),
    "row_length": (2, "the packed row length: a token and EOS at least"),
    "vocab_size": (MIN_VOCAB_SIZE, "the tokenizer's pieces, 4 reserved ids included"),
    "log_every_steps": (1, "steps between metrics rows"),
    "eval_every_steps": (0, "steps between dev-loss evaluations; 0: none"),
    "bleu_every_steps": (0, "steps between dev BLEU evaluations; 0: only at the end"),
    "checkpoint_every_steps": (1, "steps between checkpoints"),
    "keep_checkpoints": (1, "regular checkpoints kept"),
    "eval_sentences": (0, "dev sentences translated for BLEU; 0: all"),
    "eval_tokens_per_batch": (1, "tokens per dev batch"),
    "beam_size": (1, "the beam of dev BLEU's search"),
    "num_samples": (0, "sample translations logged per BLEU evaluation"),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first field whose value is out of its range."""
    for name, (least, meaning) in _INTEGERS.items():
        if name not in config:
            continue
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"config.{name}={value!r} must be an integer >= {least} ({meaning})")
    minutes = config.get("train_minutes", 0.0)
    if not _number(minutes) or not minutes >= 0:
        raise ValueError(
            f"config.train_minutes={minutes!r} must be >= 0 (0 turns the wall-clock budget off; "
            "M > 0 trains the number of steps that fits M minutes)"
        )
    scale = config.get("lr_scale", 1.0)
    if not _number(scale) or not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(
            f"config.lr_scale={scale!r} must be a finite number >= 0 (it multiplies the paper's "
            "learning rate; 1: the paper's)"
        )
    smoothing = config.get("label_smoothing", 0.0)
    if not _number(smoothing) or not 0 <= smoothing < 1:
        raise ValueError(
            f"config.label_smoothing={smoothing!r} must be in [0, 1) (the paper's: 0.1)"
        )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Start:
    """What ``check_start`` found: the run ``training.setup`` builds, known to be possible.

    Attributes:
      train_pairs: the training split, opened.
      dev_pairs: the dev split, opened.
      model_cfg: the model the run trains.
      vocab_size: the size of the tokenizer the model was built for (the workdir's, the one
        ``init_from`` copies, or ``config.vocab_size`` for one to be trained).
      source: ``init_from``'s workdir, or None.
      fine_tune: whether the run starts from ``source``'s parameters (the workdir has no
        checkpoint yet); otherwise init_from, if set, is ignored.
    """

    train_pairs: Sequence
    dev_pairs: Sequence
    model_cfg: TransformerConfig
    vocab_size: int
    source: Path | None
    fine_tune: bool


def check_start(config: ml_collections.ConfigDict, workdir: Path) -> Start:
    """Checks that ``config`` can train in ``workdir``, writing nothing (see the module doc)."""
    workdir = Path(workdir)
    check_workdir_path(workdir)
    source, fine_tune = None, False
    if config.get("init_from"):
        source, which = resume.parse_init_from(config.init_from, workdir)
        fine_tune = not resume.has_checkpoints(workdir)
        if fine_tune:
            workdir_files.check_tokenizer_copy(source, workdir)
            checkpoints.resolve(source, which)  # the checkpoint exists
    vocab_size = _tokenizer_size(config, workdir, source if fine_tune else None)
    if config.model.preset == "init_from":
        model_cfg = resume.source_model_config(config, source)
    else:
        try:
            model_cfg = model_config(config, vocab_size)
        except ValueError as err:  # TransformerConfig names the field and the value
            raise ValueError(
                f"config.model (preset {config.model.preset!r} with config.model.overrides): {err}"
            ) from None
    if config.row_length > model_cfg.max_positions:
        raise ValueError(
            f"config.row_length={config.row_length} exceeds the model's max_positions="
            f"{model_cfg.max_positions}"
        )
    workdir_files.check_model_config(workdir, model_cfg)
    if fine_tune:
        resume.check_same_model(source, model_cfg)
    train_pairs = data.open_split(config.data, "train")
    dev_pairs = data.open_split(config.data, "dev")
    return Start(train_pairs, dev_pairs, model_cfg, vocab_size, source, fine_tune)


def check_workdir_path(workdir: Path) -> None:
    """Refuses a workdir that is a file, or that this process cannot write or create."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(
            f"--workdir={workdir} is a file; expected a directory (a new one, or a workdir to "
            "resume)"
        )
    if workdir.is_dir():
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise ValueError(
                f"--workdir={workdir} is not writable: training writes its checkpoints, metrics "
                "and lock there; give this user write permission or use another --workdir"
            )
        return
    parent = workdir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create --workdir={workdir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot create --workdir={workdir}: {parent} is not writable; choose a --workdir "
            "under a directory this user may write"
        )


def _tokenizer_size(config, workdir: Path, source: Path | None) -> int:
    """The size of the tokenizer the run will use: the workdir's, the one ``init_from``
    copies, or ``config.vocab_size`` for one trained at the start. A ``tokenizer.model``
    trained in this workdir with another ``vocab_size`` than the config's is refused."""
    if workdir_files.tokenizer_files(workdir):
        if not (config.get("init_from") or _fine_tuned(workdir)):
            _check_trained_size(workdir / workdir_files.TOKENIZER, config.vocab_size, workdir)
        return workdir_files.read_tokenizer(workdir).vocab_size
    if source is not None:
        return workdir_files.read_tokenizer(source).vocab_size
    return config.vocab_size


def _fine_tuned(workdir: Path) -> bool:
    """Whether the workdir's saved config started it from another workdir (so its tokenizer
    is that one's, whatever vocab_size the config says)."""
    try:
        saved = json.loads((workdir / workdir_files.CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(saved, dict) and saved.get("init_from"))


def _check_trained_size(path: Path, vocab_size: int, workdir: Path) -> None:
    if not path.exists():  # an imported (Marian) tokenizer: not trained here
        return
    trained = trained_vocab_size(path)
    if trained == vocab_size:
        return
    if (workdir / workdir_files.MODEL_CONFIG).exists():  # a trained workdir: its model is that size
        fix = f"resume it with --config.vocab_size={trained}, or use a new --workdir"
    else:  # left by a start that failed later
        fix = (
            f"use a new --workdir, delete {path} to train a {vocab_size}-piece one here, or keep "
            f"it with --config.vocab_size={trained}"
        )
    raise ValueError(
        f"{path} was trained with vocab_size={trained}, but config.vocab_size={vocab_size}: a "
        f"workdir keeps its tokenizer; {fix}"
    )
