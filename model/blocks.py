"""The blocks every model of the family is assembled from: layers and the two stacks.

* ``EncoderLayer``: self-attention then feed-forward (section 3.1).
* ``DecoderLayer``: masked self-attention, encoder-decoder attention (unless ``cross=False``,
  as in a decoder-only LM), feed-forward.
* ``Encoder`` / ``Decoder``: a stack of N such layers (a list, or one ``nn.scan`` with
  ``scan_layers``: ``model/stacks.py``) with its final LayerNorm under pre-LN. The decoder also
  owns its decoding cache: ``init_cache`` and ``step``, one attention cache per sub-layer.

The stacks' parameters are named ``encoder_layers_N``/``encoder_norm`` and
``decoder_layers_N``/``decoder_norm``. The models put them straight into their own scope
(``nn.share_scope``), so the parameter tree is the same as before the stacks were modules and
old checkpoints load unchanged. Shapes: B batch, S source, T target, L cache, D model,
R decoder rows (B x beams).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.attention import MultiHeadAttention
from model.config import TransformerConfig
from model.dropout import Dropout
from model.layers import FeedForward, layer_norm
from model.stacks import layer_stack, run_stack, unstacked


class _Sublayers(nn.Module):
    """Residual wiring shared by encoder and decoder layers.

    Post-LN (the paper): ``LayerNorm(x + Dropout(Sublayer(x)))``.
    Pre-LN: ``x + Dropout(Sublayer(LayerNorm(x)))``.
    """

    config: TransformerConfig

    def pre(self, x: jax.Array, norm: nn.LayerNorm) -> jax.Array:
        return norm(x) if self.config.norm == "pre" else x

    def residual(self, x, out, norm, deterministic: bool) -> jax.Array:
        # The sum is taken in float32 so that bf16 compute does not round the residual stream twice.
        y = x.astype(jnp.float32) + self.dropout(out, deterministic=deterministic).astype(
            jnp.float32
        )
        y = norm(y) if self.config.norm == "post" else y
        y = y.astype(self.config.compute_dtype)
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class EncoderLayer(_Sublayers):
    """Self-attention then feed-forward, ``[B, S, D] -> [B, S, D]``."""

    def setup(self):
        cfg = self.config
        self.self_attention = MultiHeadAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm_attention = layer_norm(cfg)
        self.norm_ff = layer_norm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        h = self.pre(x, self.norm_attention)
        x = self.residual(
            x, self.self_attention(h, mask, deterministic=deterministic), self.norm_attention,
            deterministic,
        )  # fmt: skip
        h = self.pre(x, self.norm_ff)
        return self.residual(x, self.feed_forward(h), self.norm_ff, deterministic)


class DecoderLayer(_Sublayers):
    """Masked self-attention, encoder-decoder attention, feed-forward, ``[B, T, D] -> [B, T, D]``.

    Each sub-layer has its own residual connection and LayerNorm. With ``cross=False`` there is
    no encoder-decoder attention (a decoder-only language model's layer).
    """

    cross: bool = True

    def setup(self):
        cfg = self.config
        self.self_attention = MultiHeadAttention(cfg)
        if self.cross:
            self.cross_attention = MultiHeadAttention(cfg)
            self.norm_cross = layer_norm(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm_self = layer_norm(cfg)
        self.norm_ff = layer_norm(cfg)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(
        self,
        y: jax.Array,
        memory: jax.Array | None,
        self_mask: jax.Array,
        cross_mask: jax.Array | None,
        deterministic: bool = True,
    ) -> jax.Array:
        """One decoder layer over a whole target (teacher forcing).

        Args:
          y: ``[B, T, D]`` decoder stream.
          memory: ``[B, S, D]``, the encoder's output (None without cross-attention).
          self_mask: ``[B, 1, T, T]``.
          cross_mask: ``[B, 1, T, S]`` (None without cross-attention).
          deterministic: disables dropout.

        Returns:
          ``[B, T, D]``.
        """
        h = self.pre(y, self.norm_self)
        a = self.self_attention(h, self_mask, deterministic=deterministic)
        y = self.residual(y, a, self.norm_self, deterministic)
        if self.cross:
            h = self.pre(y, self.norm_cross)
            cross_kv = self.cross_attention.project_kv(memory)
            a = self.cross_attention(h, cross_mask, kv=cross_kv, deterministic=deterministic)
            y = self.residual(y, a, self.norm_cross, deterministic)
        h = self.pre(y, self.norm_ff)
        return self.residual(y, self.feed_forward(h), self.norm_ff, deterministic)

    def init_cache(self, batch: int, length: int, memory: jax.Array | None) -> dict:
        """``{'self': ..., 'cross': ...}``: each attention's own cache (see ``step``)."""
        cache = {"self": self.self_attention.init_cache(batch, length)}
        if self.cross:
            cache["cross"] = self.cross_attention.init_memory_cache(memory)
        return cache

    def step(
        self, y: jax.Array, self_mask: jax.Array, cross_mask, cache: dict, index, history=None
    ) -> tuple[jax.Array, dict]:
        """The layer on new positions during decoding, reading and extending its cache.

        Args:
          y: ``[R, T, D]`` decoder stream of the new positions (R = B * W rows, W beams).
          self_mask: ``[1, 1, T, L]``: which cache positions each new position sees.
          cross_mask: ``[B, 1, 1, S]``: the source's padding, per sentence (None without
            cross-attention).
          cache: ``init_cache``'s: ``'self'`` ``{'k', 'v'}`` ``[R, H, L, K]`` and ``'cross'``
            ``{'k', 'v'}`` ``[B, H, S, K]``.
          index: where the T new positions go in the cache.
          history: optional ``[R, L]`` int32: the row whose self-attention slot l each row
            reads (None: its own; see ``MultiHeadAttention.decode_self``).

        Returns:
          ``([R, T, D]`` outputs, the cache with the new keys and values written).
        """
        h = self.pre(y, self.norm_self)
        a, self_cache = self.self_attention.decode_self(h, self_mask, cache["self"], index, history)
        y = self.residual(y, a, self.norm_self, True)
        cache = {**cache, "self": self_cache}
        if self.cross:
            h = self.pre(y, self.norm_cross)
            a = self.cross_attention.decode_cross(h, cross_mask, cache["cross"])
            y = self.residual(y, a, self.norm_cross, True)
        h = self.pre(y, self.norm_ff)
        return self.residual(y, self.feed_forward(h), self.norm_ff, True), cache


class Encoder(nn.Module):
    """N encoder layers (and, pre-LN, a final LayerNorm): ``[B, S, D] -> [B, S, D]``."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        # A list (params encoder_layers_0, ...) or, with scan_layers, one scanned module (params
        # encoder_layers/... stacked [N, ...]); see model/stacks.py.
        self.encoder_layers = layer_stack(
            EncoderLayer, cfg, cfg.num_encoder_layers, static_argnums=(3,)
        )
        if cfg.norm == "pre":
            self.encoder_norm = layer_norm(cfg)

    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """``x [B, S, D]`` embedded inputs, ``mask [B, 1, S, S]`` -> ``[B, S, D]``."""
        x = run_stack(self.encoder_layers, x, mask, deterministic)
        return self.encoder_norm(x) if self.config.norm == "pre" else x


class Decoder(nn.Module):
    """N decoder layers (and, pre-LN, a final LayerNorm), with or without cross-attention."""

    config: TransformerConfig
    cross: bool = True

    def setup(self):
        cfg = self.config
        self.decoder_layers = layer_stack(
            DecoderLayer, cfg, cfg.num_decoder_layers, static_argnums=(5,), cross=self.cross
        )
        if cfg.norm == "pre":
            self.decoder_norm = layer_norm(cfg)

    def _final(self, y: jax.Array) -> jax.Array:
        return self.decoder_norm(y) if self.config.norm == "pre" else y

    def __call__(
        self,
        y: jax.Array,
        memory: jax.Array | None,
        self_mask: jax.Array,
        cross_mask: jax.Array | None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher forcing: ``y [B, T, D]`` embedded decoder inputs -> ``[B, T, D]`` features
        (see ``DecoderLayer.__call__`` for the other arguments)."""
        y = run_stack(self.decoder_layers, y, memory, self_mask, cross_mask, deterministic)
        return self._final(y)

    def _layers(self) -> list[DecoderLayer]:
        """The layers one by one (sliced from the stack with ``scan_layers``)."""
        cfg = self.config
        return unstacked(
            self, DecoderLayer, cfg, "decoder_layers", cfg.num_decoder_layers, cross=self.cross
        )

    def init_cache(self, batch: int, length: int, memory: jax.Array | None = None) -> tuple:
        """One ``DecoderLayer.init_cache`` per layer: ``length`` (L) self-attention positions
        for ``batch`` rows, and the encoder-decoder keys/values of ``memory [B, S, D]``."""
        max_positions = self.config.max_positions
        if not 0 < length <= max_positions:
            raise ValueError(f"cache length {length} must be in [1, {max_positions}]")
        return tuple(layer.init_cache(batch, length, memory) for layer in self._layers())

    def step(
        self,
        y: jax.Array,
        caches: tuple,
        index,
        cross_mask: jax.Array | None = None,
        history: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple]:
        """Runs the stack on ``y [R, t, D]`` (new positions ``index .. index + t - 1``);
        ``history [R, L]``, if given, is passed to every layer's self-attention.

        Returns:
          ``([R, t, D]`` features, the caches advanced).
        """
        t, length = y.shape[1], caches[0]["self"]["k"].shape[2]
        positions = index + jnp.arange(t, dtype=jnp.int32)
        self_mask = (jnp.arange(length)[None, :] <= positions[:, None])[None, None]  # [1,1,t,L]
        new = []
        for layer, cache in zip(self._layers(), caches, strict=True):
            y, cache = layer.step(y, self_mask, cross_mask, cache, index, history)
            new.append(cache)
        return self._final(y), tuple(new)
