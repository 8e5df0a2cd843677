"""A decoder-only language model (GPT-style) from the Transformer's blocks.

    model = DecoderOnlyLM(TransformerConfig.tiny(vocab_size, architecture="decoder_only"))
    logits = model.apply(variables, ids)                # ids [B, T] -> [B, T, V], causal

The decoder layers without encoder-decoder attention, causal self-attention, and the embedding
tied to the output projection. Decoding uses the same explicit cache as the encoder-decoder
model (``init_cache``, ``decode_step``), so the searches in ``decoding/`` drive it unchanged
through ``decoding.lm_decoder``. Shapes: B batch, T length, L cache, D model, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.attention import attention_mask
from model.blocks import Decoder
from model.config import TransformerConfig
from model.embedding import Embed


class DecoderOnlyLM(nn.Module):
    """Causal language model: ``P(x_t | x_<t)`` from ``[B, T]`` ids."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if cfg.architecture != "decoder_only":
            raise ValueError(
                f"DecoderOnlyLM needs architecture='decoder_only', got {cfg.architecture!r}"
            )
        self.embed = Embed(cfg)
        self.decoder = Decoder(cfg, cross=False)
        nn.share_scope(
            self, self.decoder
        )  # params decoder_layers_N, decoder_norm, as in Transformer

    def __call__(
        self,
        ids: jax.Array,
        *,
        segments: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        features_only: bool = False,
    ) -> jax.Array:
        """Teacher forcing: ``ids [B, T]`` (BOS first, 0 = padding) -> logits ``[B, T, V]``.

        Args:
          ids: input ids; position t predicts the token at t + 1.
          segments, positions: packing information (1, 2, ... per example, 0 = padding; and
            0, 1, ... within each example).
          deterministic: disables dropout.
          features_only: return the final features ``[B, T, D]`` before the output projection
            (the training loss applies it itself, ``Embed.losses``).
        """
        if segments is not None:
            valid = segments != 0
        else:  # the first position is real whatever its id, as in Transformer.decode
            valid = (ids != 0) | (jnp.arange(ids.shape[1]) == 0)[None, :]
        mask = attention_mask(valid, valid, q_segments=segments, k_segments=segments, causal=True)
        y = self.embed(ids, positions, deterministic=deterministic)
        y = self.decoder(y, None, mask, None, deterministic)
        return y if features_only else self.embed.attend(y)

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty cache for ``batch`` rows of up to ``length`` (L) positions:
        ``{'index': int32 [], 'layers': ({'self': {'k', 'v': [B, H, L, K]}}, ...)}``."""
        return {"index": jnp.array(0, jnp.int32), "layers": self.decoder.init_cache(batch, length)}

    def decode_step(self, ids: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """``ids [B, t]`` at the cache's position (t > 1 feeds a prompt at once) ->
        ``(logits [B, t, V]`` float32, the cache advanced by t)."""
        index = cache["index"]
        positions = index + jnp.arange(ids.shape[1], dtype=jnp.int32)
        y = self.embed(ids, jnp.broadcast_to(positions, ids.shape))
        y, layers = self.decoder.step(y, cache["layers"], index)
        return self.embed.attend(y), {"index": index + ids.shape[1], "layers": layers}
