"""The Transformer of "Attention Is All You Need" as functional Flax (Linen) modules."""

from model.config import TransformerConfig
from model.sharding import LOGICAL_RULES, make_mesh, use_mesh
from model.transformer import Transformer, attention_maps, shift_right

__all__ = [
    "LOGICAL_RULES",
    "Transformer",
    "TransformerConfig",
    "attention_maps",
    "make_mesh",
    "shift_right",
    "use_mesh",
]
