"""Smoke test: a few dozen steps of a tiny model on the tiny corpus shipped in the repository.

Trains in well under a minute on CPU; tests and quick checks use it. The corpus
(`data/fixtures/bible-en-es-tiny`, 2,000 + 200 public-domain verse pairs) is found relative to
this file, so the config works from any directory. Point it at other text files with
--config.data.train_prefix/dev_prefix.
"""

from pathlib import Path

from configs.common import base_config

# The repository's own fixture corpus: a fresh clone needs nothing beside it.
CORPUS = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "bible-en-es-tiny"


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.model.overrides.max_positions = 64
    c.data.source = "text"
    c.data.train_prefix = str(CORPUS / "train")
    c.data.dev_prefix = str(CORPUS / "dev")
    c.vocab_size = 500
    c.row_length = 64
    c.tokens_per_step = 1024
    c.lr_scale = 2.0
    c.warmup_steps = 10
    c.num_train_steps = 40
    c.log_every_steps = 10
    c.eval_every_steps = 40
    c.bleu_every_steps = 0
    c.eval_sentences = 16
    c.beam_size = 2
    c.num_samples = 2
    c.checkpoint_every_steps = 20
    c.checkpoint_every_minutes = 10.0
    c.keep_checkpoints = 3
    return c
