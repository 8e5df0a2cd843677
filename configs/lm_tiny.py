"""Smoke test of the decoder-only family member: a tiny Spanish language model, in seconds.

python train.py --config=configs/lm_tiny.py --workdir=runs/lm_tiny

The LM reads the target side (Spanish) of the repository's fixture corpus
(``training/objectives.py``); evaluation reports dev loss, perplexity and token accuracy
(no BLEU: there is nothing to translate). ``decode.py --workdir=...`` then continues prompts.
"""

from configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.model.overrides.architecture = "decoder_only"
    c.lr_scale = 0.5  # configs/tiny.py's 2.0 stalls these at the unigram distribution
    c.num_train_steps = 80
    c.eval_every_steps = 40
    return c
