"""Smoke test of the encoder-only family member: a tiny bilingual masked LM, in seconds.

python train.py --config=configs/mlm_tiny.py --workdir=runs/mlm_tiny

BERT's objective over both sides (English and Spanish) of the repository's fixture corpus
(``training/objectives.py``); evaluation reports the masked tokens' loss, perplexity and
accuracy (one fixed masking of the dev set).
"""

from configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.model.overrides.architecture = "encoder_only"
    c.num_train_steps = 60
    c.eval_every_steps = 30
    return c
