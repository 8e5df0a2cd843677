"""A bilingual (English + Spanish) masked language model on the default corpus.

python train.py --config=configs/mlm_default.py --workdir=runs/mlm_en_es

BERT's objective (15% of tokens: 80% masked, 10% random, 10% kept) over both sides of the
Bible verses, with the default config's width and schedule and 6 encoder layers; evaluation
reports masked-token loss, perplexity and accuracy.
"""

from configs.default import get_config as default_config


def get_config():
    c = default_config()
    c.model.overrides.architecture = "encoder_only"
    c.model.overrides.num_encoder_layers = 6
    c.model.overrides.num_decoder_layers = 0
    c.model.overrides.activation = "gelu"
    c.bleu_every_steps = 0
    return c
