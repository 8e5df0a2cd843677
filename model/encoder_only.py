"""An encoder-only masked language model (BERT-style) from the Transformer's blocks.

    model = EncoderOnly(TransformerConfig.tiny(vocab_size, architecture="encoder_only"))
    logits = model.apply(variables, ids)                # ids [B, T] -> [B, T, V]
    classes = model.apply(variables, ids, method=EncoderOnly.classify)   # [B, C]

The encoder layers (bidirectional self-attention), then BERT's masked-LM head: a dense layer,
the activation and a LayerNorm, projected with the embedding matrix (tied). With
``config.num_classes > 0`` a linear classifier reads the first token's features. The mask id
is the last embedding row, one past the tokenizer's vocabulary (``mask_id``): no tokenizer
needs a mask piece, and no text encodes to it. Shapes: B
batch, T length, D model, V vocabulary, C classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.attention import attention_mask
from model.blocks import Encoder
from model.config import TransformerConfig
from model.embedding import Embed
from model.layers import ACTIVATIONS, layer_norm
from model.tricks import matmul


def model_vocab_size(architecture: str, tokenizer_vocab_size: int) -> int:
    """The model's V: the tokenizer's, plus the mask row for an encoder-only model."""
    return tokenizer_vocab_size + (architecture == "encoder_only")


def mask_id(model_vocab: int) -> int:
    """The ``[MASK]`` id of an encoder-only model with ``model_vocab`` rows: the last one."""
    return model_vocab - 1


def _dense(module: nn.Module, name: str, shape: tuple[int, int], axes: tuple):
    """A ``[in, out]`` kernel and ``[out]`` bias named ``NAME_kernel``/``NAME_bias``; the
    output side is replicated (axis None: it is D or C, no dimension of the legend's)."""
    cfg = module.config
    kernel = module.param(
        f"{name}_kernel",
        nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        shape,
        cfg.params_dtype,
    )
    bias = module.param(
        f"{name}_bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        shape[1:],
        cfg.params_dtype,
    )
    return kernel, bias


class EncoderOnly(nn.Module):
    """Bidirectional encoder with a tied masked-LM head and an optional classifier."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if cfg.architecture != "encoder_only":
            raise ValueError(
                f"EncoderOnly needs architecture='encoder_only', got {cfg.architecture!r}"
            )
        self.embed = Embed(cfg)
        self.encoder = Encoder(cfg)
        nn.share_scope(self, self.encoder)  # params encoder_layers_N, encoder_norm
        self.mlm_kernel, self.mlm_bias = _dense(
            self, "mlm", (cfg.d_model, cfg.d_model), ("embed", None)
        )
        self.mlm_norm = layer_norm(cfg)
        if cfg.num_classes:
            self.classifier_kernel, self.classifier_bias = _dense(
                self, "classifier", (cfg.d_model, cfg.num_classes), ("embed", None)
            )

    def encode(
        self,
        ids: jax.Array,
        *,
        segments: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """``ids [B, T]`` (0 = padding) -> features ``[B, T, D]``; packed rows pass
        ``segments`` and ``positions`` as in ``Transformer.encode``."""
        valid = ids != 0
        mask = attention_mask(valid, valid, q_segments=segments, k_segments=segments)
        x = self.embed(ids, positions, deterministic=deterministic)
        return self.encoder(x, mask, deterministic)

    def __call__(
        self,
        ids: jax.Array,
        *,
        segments: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        features_only: bool = False,
    ) -> jax.Array:
        """Masked-LM logits ``[B, T, V]`` at every position (or, with ``features_only``, the
        head's features ``[B, T, D]`` before the tied projection, for the training loss)."""
        cfg = self.config
        x = self.encode(ids, segments=segments, positions=positions, deterministic=deterministic)
        h = matmul("btd,df->btf", x, self.mlm_kernel, cfg.compute_dtype) + self.mlm_bias
        h = self.mlm_norm(ACTIVATIONS[cfg.activation](h).astype(cfg.compute_dtype))
        h = nn.with_logical_constraint(h.astype(cfg.compute_dtype), ("batch", "length", "embed"))
        return h if features_only else self.embed.attend(h)

    def classify(self, ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """``ids [B, T]`` -> class logits ``[B, C]`` float32 from the first token's features."""
        cfg = self.config
        if not cfg.num_classes:
            raise ValueError("EncoderOnly.classify needs TransformerConfig.num_classes > 0")
        first = self.encode(ids, deterministic=deterministic)[:, 0]
        logits = jnp.einsum(
            "bd,dc->bc", first, self.classifier_kernel.astype(first.dtype),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return logits + self.classifier_bias.astype(jnp.float32)
