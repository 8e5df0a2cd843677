"""The paper's Transformer (base) on WMT 2014 English -> German (Table 3, BLEU 27.3).

~25,000 source + 25,000 target tokens per step, 100k steps, warmup 4000, P_drop 0.1, label
smoothing 0.1, checkpoints every 10 minutes, the last 5 averaged (section 6.1). Shared BPE
vocabulary of ~37,000. Prepare the data first (needs tensorflow-cpu to extract):
    python -m data.tfds_source wmt14_translate/de-en --data_dir ~/tensorflow_datasets
On fewer than 8 accelerators raise grad_accum_steps to keep the batch.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.model.preset = "base"
    c.model.overrides.max_positions = 256
    c.model.overrides.dtype = "bfloat16"
    c.data.source = "tfds"
    c.data.tfds_name = "wmt14_translate/de-en"
    c.data.source_lang = "en"
    c.data.target_lang = "de"
    c.vocab_size = 37_000
    c.row_length = 256
    c.tokens_per_step = 25_000
    c.num_train_steps = 100_000
    c.warmup_steps = 4000
    c.log_every_steps = 100
    c.eval_every_steps = 1000
    c.bleu_every_steps = 10_000
    c.eval_sentences = 0
    c.checkpoint_every_steps = 1_000_000  # time-based, as in the paper
    c.checkpoint_every_minutes = 10.0
    c.keep_checkpoints = 5  # the paper averages the last 5
    return c
