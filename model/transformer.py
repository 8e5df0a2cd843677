"""The encoder-decoder Transformer (section 3 of the paper) as Flax Linen modules.

    model = Transformer(TransformerConfig.base(vocab_size=37000))
    variables = model.init(jax.random.key(0), src, tgt)      # src [B, S], tgt [B, T] int32
    logits = model.apply(variables, src, tgt)                 # [B, T, V] float32

``tgt`` is the decoder input: the target shifted right, starting with BOS (``shift_right``).
Id 0 is padding everywhere. For inference the encoder runs once (``encode``), ``init_cache``
computes each layer's encoder-decoder keys/values once per sentence, and ``decode_step`` appends
self-attention keys/values to the explicit cache step by step:

    memory = model.apply(variables, src, method=Transformer.encode)
    cache = model.apply(variables, memory, src, max_len, method=Transformer.init_cache)
    logits, cache = model.apply(variables, ids, cache, method=Transformer.decode_step)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.attention import MultiHeadAttention, attention_mask
from model.config import TransformerConfig
from model.layers import Embed, FeedForward, layer_norm, sinusoidal_positions
from model.stacks import layer_stack, run_stack, unstacked

# The decoding cache; its layout is documented in Transformer.init_cache.
Cache = dict


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
        self.dropout = nn.Dropout(cfg.dropout_rate)

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

    Each sub-layer has its own residual connection and LayerNorm.
    """

    def setup(self):
        cfg = self.config
        self.self_attention = MultiHeadAttention(cfg)
        self.cross_attention = MultiHeadAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm_self = layer_norm(cfg)
        self.norm_cross = layer_norm(cfg)
        self.norm_ff = layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(
        self,
        y: jax.Array,
        memory: jax.Array,
        self_mask: jax.Array,
        cross_mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """One decoder layer over a whole target (teacher forcing).

        Args:
          y: ``[B, T, D]`` decoder stream.
          memory: ``[B, S, D]``, the encoder's output.
          self_mask: ``[B, 1, T, T]``.
          cross_mask: ``[B, 1, T, S]``.
          deterministic: disables dropout.

        Returns:
          ``[B, T, D]``.
        """
        h = self.pre(y, self.norm_self)
        a = self.self_attention(h, self_mask, deterministic=deterministic)
        y = self.residual(y, a, self.norm_self, deterministic)
        h = self.pre(y, self.norm_cross)
        cross_kv = self.cross_attention.project_kv(memory)
        a = self.cross_attention(h, cross_mask, kv=cross_kv, deterministic=deterministic)
        y = self.residual(y, a, self.norm_cross, deterministic)
        h = self.pre(y, self.norm_ff)
        return self.residual(y, self.feed_forward(h), self.norm_ff, deterministic)

    def step(
        self, y: jax.Array, self_mask: jax.Array, cross_mask: jax.Array, cache: dict, index
    ) -> tuple[jax.Array, dict]:
        """The layer on new positions during decoding, reading and extending its cache.

        Args:
          y: ``[R, T, D]`` decoder stream of the new positions (R = B * n rows, n beams).
          self_mask: ``[1, 1, T, L]``: which cache positions each new position sees.
          cross_mask: ``[B, 1, 1, S]``: the source's padding, per sentence.
          cache: ``{'k', 'v'}`` ``[R, H, L, K]`` and ``{'cross_k', 'cross_v'}`` ``[B, H, S, K]``.
          index: where the T new positions go in the cache.

        Returns:
          ``([R, T, D]`` outputs, the cache with the new keys and values written).
        """
        h = self.pre(y, self.norm_self)
        k_new, v_new = self.self_attention.project_kv_cache(h)  # [R, H, T, K]
        start = (0, 0, index, 0)
        cache = {
            **cache,
            "k": jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), start),
            "v": jax.lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), start),
        }
        a = self.self_attention.attend_cache(h, cache["k"], cache["v"], self_mask)
        y = self.residual(y, a, self.norm_self, True)
        h = self.pre(y, self.norm_cross)
        a = self.cross_attention.attend_cache(h, cache["cross_k"], cache["cross_v"], cross_mask)
        y = self.residual(y, a, self.norm_cross, True)
        h = self.pre(y, self.norm_ff)
        return self.residual(y, self.feed_forward(h), self.norm_ff, True), cache


class Transformer(nn.Module):
    """Encoder-decoder Transformer with shared embeddings and tied output projection."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embed = Embed(cfg)
        # Lists of layers (params encoder_layers_0, ...) or, with scan_layers, one scanned
        # module each (params encoder_layers/... stacked [N, ...]); see model/stacks.py.
        self.encoder_layers = layer_stack(
            EncoderLayer, cfg, cfg.num_encoder_layers, static_argnums=(3,)
        )
        self.decoder_layers = layer_stack(
            DecoderLayer, cfg, cfg.num_decoder_layers, static_argnums=(5,)
        )
        if cfg.norm == "pre":
            self.encoder_norm = layer_norm(cfg)
            self.decoder_norm = layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.position_table = sinusoidal_positions(
            cfg.max_len, cfg.d_model, cfg.positional_encoding
        )

    def _embed(self, ids: jax.Array, positions: jax.Array | None, deterministic: bool):
        """``[B, T]`` ids -> Dropout(Embed(ids) * sqrt(D) + PE(positions)), ``[B, T, D]``."""
        cfg = self.config
        length = ids.shape[1]
        if length > cfg.max_len:
            raise ValueError(
                f"sequence length {length} exceeds TransformerConfig.max_len={cfg.max_len}"
            )
        if positions is None:
            pe = self.position_table[None, :length]
        else:
            pe = jnp.take(self.position_table, positions, axis=0)
        x = self.embed(ids).astype(jnp.float32) + pe
        x = self.dropout(x, deterministic=deterministic).astype(cfg.compute_dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def encode(
        self,
        src: jax.Array,
        *,
        src_segments: jax.Array | None = None,
        src_positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encoder: ``[B, S]`` ids (0 = padding) -> memory ``[B, S, D]``.

        Packed rows pass ``src_segments`` (1, 2, ... per example, 0 = padding) and
        ``src_positions`` (0, 1, ... within each example).
        """
        valid = src != 0
        mask = attention_mask(valid, valid, q_segments=src_segments, k_segments=src_segments)
        x = self._embed(src, src_positions, deterministic)
        x = run_stack(self.encoder_layers, x, mask, deterministic)
        return self.encoder_norm(x) if self.config.norm == "pre" else x

    def decode(
        self,
        memory: jax.Array,
        src: jax.Array,
        tgt: jax.Array,
        *,
        src_segments: jax.Array | None = None,
        tgt_segments: jax.Array | None = None,
        tgt_positions: jax.Array | None = None,
        deterministic: bool = True,
        features_only: bool = False,
    ) -> jax.Array:
        """Decoder over a whole target (teacher forcing): ``[B, T]`` -> logits ``[B, T, V]``.

        Args:
          memory: ``[B, S, D]`` from ``encode``.
          src: ``[B, S]`` source ids (only their padding is used).
          tgt: ``[B, T]`` decoder input ids (shifted right; 0 = padding).
          src_segments, tgt_segments, tgt_positions: packing information (see ``encode``).
          deterministic: disables dropout.
          features_only: return the decoder's output ``[B, T, D]`` before the output
            projection (the training loss applies it itself, ``training.step.output_losses``).
        """
        src_valid = src != 0
        # The decoder's start token may be the padding id (Marian's is), so where real target
        # tokens are is known from the segments, or else from "position 0 or not padding".
        if tgt_segments is not None:
            tgt_valid = tgt_segments != 0
        else:
            tgt_valid = (tgt != 0) | (jnp.arange(tgt.shape[1]) == 0)[None, :]
        self_mask = attention_mask(
            tgt_valid, tgt_valid, q_segments=tgt_segments, k_segments=tgt_segments, causal=True
        )
        cross_mask = attention_mask(
            tgt_valid, src_valid, q_segments=tgt_segments, k_segments=src_segments
        )
        y = self._embed(tgt, tgt_positions, deterministic)
        y = run_stack(self.decoder_layers, y, memory, self_mask, cross_mask, deterministic)
        if features_only:
            return self.decoder_norm(y) if self.config.norm == "pre" else y
        return self._logits(y)

    def _decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers one by one (sliced from the stack with ``scan_layers``)."""
        cfg = self.config
        return unstacked(self, DecoderLayer, cfg, "decoder_layers", cfg.num_decoder_layers)

    def _logits(self, y: jax.Array) -> jax.Array:
        y = self.decoder_norm(y) if self.config.norm == "pre" else y
        return self.embed.attend(y)

    def __call__(
        self,
        src: jax.Array,
        tgt: jax.Array,
        *,
        src_segments: jax.Array | None = None,
        tgt_segments: jax.Array | None = None,
        src_positions: jax.Array | None = None,
        tgt_positions: jax.Array | None = None,
        deterministic: bool = True,
        features_only: bool = False,
    ) -> jax.Array:
        """Training/scoring forward pass: ``src [B, S]``, ``tgt [B, T]`` -> logits ``[B, T, V]``
        (or, with ``features_only``, the decoder's output ``[B, T, D]``, see ``decode``)."""
        if (src_segments is None) != (tgt_segments is None):
            raise ValueError("pass both src_segments and tgt_segments, or neither")
        memory = self.encode(
            src, src_segments=src_segments, src_positions=src_positions, deterministic=deterministic
        )
        return self.decode(
            memory,
            src,
            tgt,
            src_segments=src_segments,
            tgt_segments=tgt_segments,
            tgt_positions=tgt_positions,
            deterministic=deterministic,
            features_only=features_only,
        )

    def init_cache(self, memory: jax.Array, src: jax.Array, max_len: int) -> Cache:
        """An empty decoding cache for up to ``max_len`` target positions.

        The encoder-decoder keys/values of every layer are computed here, once per sentence.
        Keys and values are head-major (``[B, H, L, K]``, see ``cached_attention``).

        Args:
          memory: ``[B, S, D]`` from ``encode``.
          src: ``[B, S]`` source ids (for the padding mask).
          max_len: L, the longest target the cache will hold (<= ``config.max_len``).

        Returns:
          ``{'index': int32 [], 'src_valid': bool [B, S], 'layers': ({'k', 'v': [B, H, L, K]
          self-attention, filled step by step; 'cross_k', 'cross_v': [B, H, S, K]}, ...)}``.
          A search with n beams may repeat the rows of ``k`` and ``v`` (R = B * n rows, rows
          ``b * n ..`` for sentence b) and keep the rest per sentence: ``decode_step`` reads
          the number of beams from the ratio.
        """
        cfg = self.config
        if not 0 < max_len <= cfg.max_len:
            raise ValueError(f"cache max_len={max_len} must be in [1, {cfg.max_len}]")
        shape = (src.shape[0], cfg.num_heads, max_len, cfg.head_dim)
        layers = []
        for layer in self._decoder_layers():
            k, v = layer.cross_attention.project_kv_cache(memory)
            zeros = jnp.zeros(shape, cfg.compute_dtype)
            layers.append({"k": zeros, "v": zeros, "cross_k": k, "cross_v": v})
        return {"index": jnp.array(0, jnp.int32), "src_valid": src != 0, "layers": tuple(layers)}

    def decode_step(self, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Runs the decoder on ``ids [R, t]`` (usually t = 1) at the cache's current position.

        Positions ``index .. index + t - 1`` must fit in the cache (``init_cache``'s max_len);
        decoding is deterministic (no dropout). R is the cache's self-attention rows: B, or
        B * n with n beams per sentence (see ``init_cache``).

        Returns:
          ``(logits [R, t, V]`` float32, the cache advanced by t positions).
        """
        index = cache["index"]
        t = ids.shape[1]
        length = cache["layers"][0]["k"].shape[2]
        positions = index + jnp.arange(t, dtype=jnp.int32)  # [t]
        y = self._embed(ids, jnp.broadcast_to(positions, ids.shape), deterministic=True)
        self_mask = (jnp.arange(length)[None, :] <= positions[:, None])[None, None]  # [1,1,t,L]
        cross_mask = cache["src_valid"][:, None, None, :]  # [B, 1, 1, S]
        new_layers = []
        for layer, layer_cache in zip(self._decoder_layers(), cache["layers"], strict=True):
            y, layer_cache = layer.step(y, self_mask, cross_mask, layer_cache, index)
            new_layers.append(layer_cache)
        new_cache = {**cache, "index": index + t, "layers": tuple(new_layers)}
        return self._logits(y), new_cache


def shift_right(targets: jax.Array, bos_id: int, segments: jax.Array | None = None) -> jax.Array:
    """Decoder inputs from targets: BOS at each example's start, padding kept as padding.

    Args:
      targets: ``[B, T]`` target ids ending in EOS, 0 = padding.
      bos_id: the decoder start id. It may be 0, the padding id (Marian's decoder starts from
        its padding token): ``Transformer.decode`` treats each example's first position as
        real whatever its id.
      segments: ``[B, T]`` segment ids of packed rows, or None for one example per row.

    Returns:
      ``[B, T]`` decoder input ids.
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    if segments is None:
        starts = jnp.zeros(targets.shape, bool).at[:, 0].set(True)
    else:
        starts = segments != jnp.pad(segments, ((0, 0), (1, 0)))[:, :-1]
    shifted = jnp.where(starts, bos_id, shifted)
    return jnp.where(targets == 0, 0, shifted).astype(targets.dtype)


def attention_maps(model: Transformer, variables, src: jax.Array, tgt: jax.Array, **kwargs):
    """Attention probabilities of every layer and head, for plots.

    Returns:
      ``{'encoder_self': [N, B, H, S, S], 'decoder_self': [N, B, H, T, T],
      'decoder_cross': [N, B, H, T, S]}`` float32 arrays.
    """
    _, state = model.apply(variables, src, tgt, mutable="intermediates", **kwargs)
    inter = state["intermediates"]
    cfg = model.config

    def stack(prefix, count, module):
        if cfg.scan_layers:  # already stacked on the layer axis
            return inter[prefix][module]["attention_weights"][0]
        return jnp.stack(
            [inter[f"{prefix}_{i}"][module]["attention_weights"][0] for i in range(count)]
        )

    return {
        "encoder_self": stack("encoder_layers", cfg.num_encoder_layers, "self_attention"),
        "decoder_self": stack("decoder_layers", cfg.num_decoder_layers, "self_attention"),
        "decoder_cross": stack("decoder_layers", cfg.num_decoder_layers, "cross_attention"),
    }
