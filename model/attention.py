"""Multi-head scaled dot-product attention (section 3.2 of the paper).

Shape legend, used in einsums, docstrings and logical axis names across the project:

    B  batch           (``batch``)
    S  source length   (``length``)
    T  target length   (``length``)
    L  cache length    (``length``)
    D  d_model         (``embed``)
    H  heads           (``heads``)
    K  head dim, D / H (``kv``)
    F  feed-forward    (``mlp``)
    V  vocabulary      (``vocab``)
    W  beams per sentence (beam width)
    R  decoder rows when decoding: B sentences x W beams (``batch``)
    C  classes of a classification head

Masks are boolean ``[B, 1, T, S]`` (True = may attend), broadcast over heads. Decoding caches
keep keys and values head-major, ``[B, H, L, K]``, the layout the per-step einsums read without
a transpose of the whole cache.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.config import TransformerConfig
from model.tricks import attention_probs, bernoulli, large_negative, matmul, softmax_attention

_log = logging.getLogger(__name__)


def attention_mask(
    q_valid: jax.Array,
    k_valid: jax.Array,
    *,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    causal: bool = False,
) -> jax.Array:
    """Which keys each query may attend to.

    Args:
      q_valid: ``[B, T]`` bool, True at real (non-padding) query positions.
      k_valid: ``[B, S]`` bool, True at real key positions.
      q_segments: optional ``[B, T]`` int segment ids of packed queries.
      k_segments: optional ``[B, S]`` int segment ids of packed keys.
      causal: also forbid keys after the query (requires T == S, positions aligned).

    Returns:
      ``[B, 1, T, S]`` bool. Padding queries attend to nothing; their outputs are finite
      (a uniform average) and are ignored downstream.
    """
    mask = q_valid[:, None, :, None] & k_valid[:, None, None, :]
    if q_segments is not None:
        mask &= q_segments[:, None, :, None] == k_segments[:, None, None, :]
    if causal:
        t, s = q_valid.shape[1], k_valid.shape[1]
        mask &= jnp.tril(jnp.ones((t, s), dtype=bool))[None, None]
    return mask


def einsum_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention spelled out, for when the weights are needed or attention dropout is on.

    Args:
      q: ``[B, T, H, K]`` queries. k, v: ``[B, S, H, K]``. mask: ``[B, 1, T, S]`` bool.

    Returns:
      ``([B, T, H, K]`` outputs, ``[B, H, T, S]`` float32 attention probabilities).
    """
    probs = attention_probs(q, k, mask)
    dropped = probs
    if dropout_rate > 0.0:
        keep = bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        dropped = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhts,bshk->bthk", dropped.astype(v.dtype), v)
    return out, probs


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention without weights or dropout: cuDNN flash attention on GPU in bf16/fp16,
    ``softmax_attention`` elsewhere.

    Shapes as in ``einsum_attention``; returns ``[B, T, H, K]``.
    """
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        except Exception as err:  # cuDNN rejects some shapes/versions at trace time.
            _log.warning("cuDNN attention unavailable (%s); using the XLA implementation", err)
    return softmax_attention(q, k, v, mask)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of a few new queries over head-major cached keys and values (decoding).

    On CPU, XLA runs the ``[B, T, H, K] x [B, S, H, K]`` layout of ``einsum_attention`` as one
    transpose of the whole cache plus one tiny matmul per (row, head); with the cache kept
    head-major the einsums read it in place (timings: ``bench/HISTORY.md``).

    Args:
      q: ``[B, T, H, K]`` queries. k, v: ``[B, H, S, K]``. mask: ``[B or 1, 1, T, S]`` bool.

    Returns:
      ``[B, T, H, K]``, equal to ``einsum_attention``'s output up to float rounding.
    """
    # Both products as plain batched matmuls over (b, h): an output layout other than the
    # batch dims first sends XLA's CPU dot to a generic path, 2.6x slower here (measured at
    # 64 sentences x 4 beams over 48 source positions); the transposes move only T x K.
    q = jnp.swapaxes(q, 1, 2)  # [B, H, T, K]
    logits = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)
    logits *= jnp.asarray(q.shape[-1] ** -0.5, jnp.float32)
    logits = jnp.where(mask, logits, large_negative(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.swapaxes(jnp.einsum("bhts,bhsk->bhtk", probs.astype(v.dtype), v), 1, 2)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W^O, head_i = Attention(Q W_i^Q, ...).

    The projections carry no biases, as in the paper's equations, unless
    ``config.attention_bias`` (Marian's attention has them).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
        # Xavier over (D) -> (H*K), i.e. the fan-in/out of the paper's D x D matrices.
        w_in = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        w_out = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        in_axes, out_axes = ("embed", "heads", "kv"), ("heads", "kv", "embed")

        def proj(name, init, axes, shape):
            boxed = nn.with_logical_partitioning(init, axes)
            return self.param(name, boxed, shape, cfg.params_dtype)

        self.query = proj("query", w_in, in_axes, (d, h, k))
        self.key = proj("key", w_in, in_axes, (d, h, k))
        self.value = proj("value", w_in, in_axes, (d, h, k))
        self.out = proj("out", w_out, out_axes, (h, k, d))
        if cfg.attention_bias:
            zeros = nn.initializers.zeros_init()
            self.query_bias = proj("query_bias", zeros, ("heads", "kv"), (h, k))
            self.key_bias = proj("key_bias", zeros, ("heads", "kv"), (h, k))
            self.value_bias = proj("value_bias", zeros, ("heads", "kv"), (h, k))
            self.out_bias = proj("out_bias", zeros, ("embed",), (d,))

    def _heads(self, x: jax.Array, w: jax.Array, bias: str) -> jax.Array:
        y = matmul("btd,dhk->bthk", x, w, self.config.compute_dtype)
        if self.config.attention_bias:
            y = y + getattr(self, bias)
        y = y.astype(self.config.compute_dtype)
        return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, S, D]`` -> keys and values, each ``[B, S, H, K]``."""
        return self._heads(x, self.key, "key_bias"), self._heads(x, self.value, "value_bias")

    def project_kv_cache(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, S, D]`` -> head-major keys and values for a decoding cache, ``[B, H, S, K]``."""
        return tuple(jnp.swapaxes(y, 1, 2) for y in self.project_kv(x))

    def attend_cache(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Attends from new decoder positions to cached keys and values (no dropout).

        The rows of ``x`` may be a multiple of the cache's: with a per-sentence cache (the
        encoder memory's keys and values) and ``R = B * W`` rows (W beams per sentence), rows
        ``b * W .. b * W + W - 1`` all read sentence b, as W extra query positions, so the
        memory is never copied per beam.

        Args:
          x: ``[R, T, D]`` query-side inputs.
          k, v: ``[B, H, S, K]`` head-major keys and values (``project_kv_cache``), R = B * W.
          mask: ``[B or 1, 1, T, S]`` bool, shared by a sentence's n rows.

        Returns:
          ``[R, T, D]``.
        """
        q = self._heads(x, self.query, "query_bias")  # [R, T, H, K]
        rows, t = q.shape[:2]
        group = rows // k.shape[0]
        if group * k.shape[0] != rows:
            raise ValueError(f"{rows} query rows are not a multiple of the cache's {k.shape[0]}")
        if group > 1:  # [B*n, T, H, K] -> [B, n*T, H, K]; the mask does not depend on T then.
            q = q.reshape(k.shape[0], group * t, *q.shape[2:])
            mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, mask.shape[-1]))
            mask = jnp.tile(mask, (1, 1, group, 1))
        out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        out = out.reshape(rows, t, *out.shape[2:])
        return self._project_out(out)

    def _project_out(self, out: jax.Array) -> jax.Array:
        """``[B, T, H, K]`` heads -> ``[B, T, D]`` (W^O, plus its bias if any)."""
        cfg = self.config
        y = matmul("bthk,hkd->btd", out, self.out, cfg.compute_dtype)
        if cfg.attention_bias:
            y = y + self.out_bias
        return y.astype(cfg.compute_dtype)

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty self-attention cache for ``length`` positions: ``{'k', 'v'}`` zeros
        ``[B, H, L, K]`` in the compute dtype, filled by ``decode_self``."""
        cfg = self.config
        zeros = jnp.zeros((batch, cfg.num_heads, length, cfg.head_dim), cfg.compute_dtype)
        return {"k": zeros, "v": zeros}

    def init_memory_cache(self, memory: jax.Array) -> dict:
        """The keys and values of an encoder ``memory [B, S, D]``, computed once per sentence
        for encoder-decoder attention: ``{'k', 'v'}`` ``[B, H, S, K]``, read-only."""
        k, v = self.project_kv_cache(memory)
        return {"k": k, "v": v}

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        *,
        kv: tuple[jax.Array, jax.Array] | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Attends from ``x`` to ``kv`` (default: self-attention over ``x``), as in training.

        Decoding, with a cache, goes through ``decode_self`` and ``decode_cross`` instead.

        Args:
          x: ``[B, T, D]`` query-side inputs.
          mask: ``[B, 1, T, S]`` bool.
          kv: precomputed ``([B, S, H, K], [B, S, H, K])`` keys and values (``project_kv`` of
            the encoder memory, for encoder-decoder attention); None: ``project_kv(x)``.
          deterministic: disables attention dropout.

        Returns:
          ``[B, T, D]``. When the ``intermediates`` collection is mutable, also sows the
          float32 probabilities ``[B, H, T, S]`` as ``attention_weights``.
        """
        cfg = self.config
        q = self._heads(x, self.query, "query_bias")
        k, v = self.project_kv(x) if kv is None else kv
        dropout = 0.0 if deterministic else cfg.attention_dropout_rate
        want_weights = self.is_mutable_collection("intermediates")
        if want_weights or dropout > 0.0:
            rng = self.make_rng("dropout") if dropout > 0.0 else None
            out, probs = einsum_attention(q, k, v, mask, dropout_rate=dropout, dropout_rng=rng)
            if want_weights:
                self.sow("intermediates", "attention_weights", probs)
        else:
            out = fused_attention(q, k, v, mask)
        return self._project_out(out)

    def decode_self(
        self,
        x: jax.Array,
        mask: jax.Array,
        cache: dict,
        index: jax.Array,
        history: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """Self-attention of new decoder positions: writes their keys and values into the
        cache at ``index ..``, then attends over it (no dropout).

        Args:
          x: ``[R, T, D]`` the new positions' inputs.
          mask: ``[B or 1, 1, T, L]`` bool: which cache slots each new position sees.
          cache: ``init_cache``'s ``{'k', 'v'}`` ``[R, H, L, K]``.
          index: where the T new positions go.
          history: optional ``[R, L]`` int32: row r attends to slot l of row ``history[r, l]``
            (beams sharing a sentence's cache: slots are written once and never move, and each
            hypothesis reads its ancestors' slots, so no search copies the cache to follow its
            beams). None: each row reads its own.

        Returns:
          ``([R, T, D]``, the cache with the new keys and values written).
        """
        k_new, v_new = self.project_kv_cache(x)  # [R, H, T, K]
        start = (0, 0, index, 0)
        cache = {
            name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), start)
            for name, new in (("k", k_new), ("v", v_new))
        }
        k, v = cache["k"], cache["v"]
        if history is not None:  # [R, H, L, K]: row history[r, l]'s slot l, every head.
            heads = jnp.arange(k.shape[1])[None, :, None]
            slots = jnp.arange(k.shape[2])[None, None, :]
            k, v = (c[history[:, None, :], heads, slots] for c in (k, v))
        return self.attend_cache(x, k, v, mask), cache

    def decode_cross(self, x: jax.Array, mask: jax.Array, cache: dict) -> jax.Array:
        """Encoder-decoder attention of new decoder positions over ``init_memory_cache``'s
        read-only ``{'k', 'v'}`` ``[B, H, S, K]`` (no dropout).

        Args:
          x: ``[R, T, D]`` (R = B * W rows with W beams, see ``attend_cache``).
          mask: ``[B, 1, 1, S]`` bool: the source's padding.
          cache: the memory's keys and values.

        Returns:
          ``[R, T, D]``.
        """
        return self.attend_cache(x, cache["k"], cache["v"], mask)
