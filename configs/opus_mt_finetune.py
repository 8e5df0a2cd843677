"""Fine-tune an imported OPUS-MT model on your parallel text (by default, the Bible corpus).

    python convert.py --input=marian:opus-mt-en-es --output=workdir:runs/opus-mt-en-es
    python train.py --config=configs/opus_mt_finetune.py --workdir=runs/opus-ft \
        --config.init_from=runs/opus-mt-en-es \
        [--config.data.source=text --config.data.train_prefix=PATH/train \
         --config.data.dev_prefix=PATH/dev]

The model and the tokenizer are the import's (``model.preset = "init_from"``); Adam starts
afresh. The rates are those usual for fine-tuning Marian models (a peak of 5e-5, as in
transformers' translation examples), not tuned here.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.model.preset = "init_from"  # the model of --config.init_from's workdir
    c.model.overrides.dropout_rate = 0.1  # OPUS-MT's
    c.row_length = 128
    c.tokens_per_step = 4096
    c.warmup_steps = 200
    # lr = lr_scale * 512^-0.5 * min(step^-0.5, step * 200^-1.5): peak 5.0e-5 at step 200.
    c.lr_scale = 0.016
    c.num_train_steps = 2000
    c.cooldown_steps = 500
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.bleu_every_steps = 500
    c.eval_sentences = 300
    c.checkpoint_every_steps = 500
    return c
