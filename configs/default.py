"""The main job: English -> Spanish Bible verses (built on first use), sized for a 2-core CPU.

python train.py --config=configs/default.py --workdir=runs/default
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.model.preset = "base"
    c.model.overrides.d_model = 256
    c.model.overrides.num_heads = 4
    c.model.overrides.d_ff = 1024
    c.model.overrides.num_encoder_layers = 3
    c.model.overrides.num_decoder_layers = 3
    c.model.overrides.max_len = 256
    # float32: this project's reference CPU (AVX2, no bf16 units) runs bf16 matmuls slower.
    c.model.overrides.dtype = "float32"
    c.vocab_size = 8000
    c.max_len = 128
    c.tokens_per_step = 1024
    c.lr_scale = 0.5
    c.warmup_steps = 400
    c.num_train_steps = 2200
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.bleu_every_steps = 400
    c.eval_sentences = 300  # greedy on 300 dev sentences during training
    c.beam_size = 1
    c.checkpoint_every_steps = 200
    c.checkpoint_every_minutes = 5.0
    c.keep_checkpoints = 5
    return c
