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
    # configs/tiny.py's 1.0 stays at the unigram distribution for these 80 steps; 0.5 learns
    # beyond it (tests/test_family_training.py checks that it does).
    c.lr_scale = 0.5
    c.num_train_steps = 80
    c.eval_every_steps = 40
    return c
