"""A Spanish language model on the default corpus (the target side of the Bible verses).

python train.py --config=configs/lm_default.py --workdir=runs/lm_es

The default config's model size and schedule (d_model 256, 3 decoder layers, 25 minutes on
a 2-core CPU) with the decoder-only architecture; dev perplexity instead of BLEU. Continue
prompts with ``decode.py --workdir=runs/lm_es --method=sample``.
"""

from configs.default import get_config as default_config


def get_config():
    c = default_config()
    c.model.overrides.architecture = "decoder_only"
    c.model.overrides.num_encoder_layers = 0
    c.model.overrides.num_decoder_layers = 6  # the encoder-decoder's 3 + 3 layers, in one stack
    c.bleu_every_steps = 0
    return c
