"""The encoder-decoder Transformer (section 3 of the paper) as Flax Linen modules.

    model = Transformer(TransformerConfig.base(vocab_size=37000))
    variables = model.init(jax.random.key(0), src, tgt)      # src [B, S], tgt [B, T] int32
    logits = model.apply(variables, src, tgt)                 # [B, T, V] float32

``tgt`` is the decoder input: the target shifted right, starting with BOS (``shift_right``).
Id 0 is padding everywhere. For inference the encoder runs once (``encode``), ``init_cache``
computes each layer's encoder-decoder keys/values once per sentence, and ``decode_step`` appends
self-attention keys/values to the explicit cache step by step:

    memory = model.apply(variables, src, method=Transformer.encode)
    cache = model.apply(variables, memory, src, cache_length, method=Transformer.init_cache)
    logits, cache = model.apply(variables, ids, cache, method=Transformer.decode_step)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.attention import attention_mask
from model.blocks import Decoder, Encoder
from model.config import TransformerConfig
from model.embedding import Embed

# The decoding cache; its layout is documented in Transformer.init_cache.
Cache = dict


class Transformer(nn.Module):
    """Encoder-decoder Transformer with shared embeddings and tied output projection."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        if not (cfg.architecture == "encoder_decoder"):
            raise ValueError(
                f"Transformer needs architecture='encoder_decoder', got {cfg.architecture!r} "
                "(model.build_model picks the class)"
            )
        self.embed = Embed(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # The stacks' parameters live in this module's scope (encoder_layers_0, decoder_norm,
        # ...), as they did before the stacks were modules: old checkpoints load unchanged.
        nn.share_scope(self, self.encoder)
        nn.share_scope(self, self.decoder)

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
        x = self.embed(src, src_positions, deterministic=deterministic)
        return self.encoder(x, mask, deterministic)

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
            projection (the training loss applies it itself, ``Embed.losses``).
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
        y = self.embed(tgt, tgt_positions, deterministic=deterministic)
        y = self.decoder(y, memory, self_mask, cross_mask, deterministic)
        return y if features_only else self.embed.attend(y)

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

    def init_cache(self, memory: jax.Array, src: jax.Array, length: int) -> Cache:
        """An empty decoding cache for up to ``length`` (L) target positions.

        The encoder-decoder keys/values of every layer are computed here, once per sentence.
        Keys and values are head-major (``[B, H, L, K]``, see ``cached_attention``).

        Args:
          memory: ``[B, S, D]`` from ``encode``.
          src: ``[B, S]`` source ids (for the padding mask).
          length: L, the longest target the cache will hold (<= ``config.max_positions``).

        Returns:
          ``{'index': int32 [], 'src_valid': bool [B, S], 'beams': int32 [B, L], 'layers':
          ({'self': {'k', 'v': [B, H, L, K]}, filled step by step; 'cross': {'k', 'v':
          [B, H, S, K]}}, ...)}``. A search with W beams repeats the rows of ``'beams'`` and
          of the ``'self'`` entries (R = B * W rows, rows ``b * W ..`` for sentence b) and
          keeps the rest per sentence: ``decode_step`` reads the number of beams from the
          ratio. Slot l of row r's keys and values is written once, by row r at step l, and
          never moves: ``'beams'[r, l]`` names the beam of r's sentence whose slot l belongs
          to r's history, so a search reorders ``'beams'`` to follow the surviving beams and
          leaves the keys and values where they are.
        """
        layers = self.decoder.init_cache(src.shape[0], length, memory)
        return {
            "index": jnp.array(0, jnp.int32),
            "src_valid": src != 0,
            "beams": jnp.zeros((src.shape[0], length), jnp.int32),
            "layers": layers,
        }

    def decode_step(self, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Runs the decoder on ``ids [R, t]`` (usually t = 1) at the cache's current position.

        Positions ``index .. index + t - 1`` must fit in the cache (``init_cache``'s length);
        decoding is deterministic (no dropout). R is the cache's self-attention rows: B, or
        B * W with W beams per sentence (see ``init_cache``).

        Returns:
          ``(logits [R, t, V]`` float32, the cache advanced by t positions).
        """
        index, (rows, t) = cache["index"], ids.shape
        positions = index + jnp.arange(t, dtype=jnp.int32)
        y = self.embed(ids, jnp.broadcast_to(positions, ids.shape))
        cross_mask = cache["src_valid"][:, None, None, :]  # [B, 1, 1, S]
        beams, history = cache["beams"], None
        group = rows // cache["src_valid"].shape[0]
        if group > 1:  # Beams: each row reads its history's slots from the rows that wrote them.
            own = jnp.broadcast_to((jnp.arange(rows, dtype=jnp.int32) % group)[:, None], (rows, t))
            beams = jax.lax.dynamic_update_slice(beams, own, (0, index))
            history = (jnp.arange(rows, dtype=jnp.int32) // group * group)[:, None] + beams
        y, layers = self.decoder.step(y, cache["layers"], index, cross_mask, history)
        new_cache = {**cache, "index": index + t, "beams": beams, "layers": layers}
        return self.embed.attend(y), new_cache


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
