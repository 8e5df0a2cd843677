"""The paper's Transformer (big) on WMT 2014 English -> German (Table 3, BLEU 28.4).

As base, with d_model 1024, d_ff 4096, 16 heads, P_drop 0.3, 300k steps, and the last 20
checkpoints (written every 10 minutes) averaged.
"""

from configs.wmt14_en_de_base import get_config as base


def get_config():
    c = base()
    c.model.preset = "big"
    c.num_train_steps = 300_000
    c.keep_checkpoints = 20
    return c
