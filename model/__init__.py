"""The Transformer of "Attention Is All You Need" and its family, as Flax (Linen) modules.

``Transformer`` (the paper's encoder-decoder), ``DecoderOnlyLM`` (GPT-style) and
``EncoderOnly`` (BERT-style) are assembled from the same blocks (``model/blocks.py``,
``model/embedding.py``, ``model/attention.py``) and configured by one ``TransformerConfig``
whose ``architecture`` field names the assembly; ``build_model`` picks the class.
"""

import jax.numpy as jnp

from model.config import TransformerConfig
from model.decoder_only import DecoderOnlyLM
from model.encoder_only import EncoderOnly
from model.sharding import LOGICAL_RULES, make_mesh, use_mesh
from model.transformer import Transformer, attention_maps, shift_right

MODEL_CLASSES = {
    "encoder_decoder": Transformer,
    "decoder_only": DecoderOnlyLM,
    "encoder_only": EncoderOnly,
}


def build_model(config: TransformerConfig):
    """The module ``config.architecture`` names: Transformer, DecoderOnlyLM or EncoderOnly."""
    return MODEL_CLASSES[config.architecture](config)


def init_inputs(config: TransformerConfig, length: int = 8) -> tuple:
    """Example ``[1, length]`` int32 inputs for ``model.init``: a source and a target for the
    encoder-decoder, one sequence for the family's halves."""
    ids = jnp.ones((1, length), jnp.int32)
    return (ids, ids) if config.architecture == "encoder_decoder" else (ids,)


__all__ = [
    "LOGICAL_RULES",
    "MODEL_CLASSES",
    "DecoderOnlyLM",
    "EncoderOnly",
    "Transformer",
    "TransformerConfig",
    "attention_maps",
    "build_model",
    "init_inputs",
    "make_mesh",
    "shift_right",
    "use_mesh",
]
