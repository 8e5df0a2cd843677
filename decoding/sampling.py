"""Greedy search and ancestral sampling (temperature, top-k, top-p), one token per step.

Both run a ``lax.while_loop`` that stops once every sentence has emitted EOS (or reached its
length limit), so they are jit-compatible and batched over sentences:

    tokens_to_logits, cache = decoding.cached_decoder(model, variables, src, max_len=64)
    ids, lengths = greedy_search(tokens_to_logits, cache, batch_size=B, bos_id=2, eos_id=1,
                                 max_len=64)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from decoding.cache import (
    PAD_ID,
    Cache,
    TokensToLogits,
    check_cache,
    length_limits,
    restrict_tokens,
    while_growing,
)

# (logits [B, V] float32 with forbidden entries at -inf, PRNG key or None) -> ids [B] int32
Chooser = Callable[[jax.Array, jax.Array | None], jax.Array]


def greedy_search(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    *,
    batch_size: int,
    bos_id: int | jax.Array,
    eos_id: int,
    max_len: int,
    max_lengths: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Picks the most probable next token at every step (never padding).

    Args:
      tokens_to_logits: ``(ids [B, 1] int32, cache) -> (logits [B, V], cache)``.
      cache: the initial cache; non-scalar leaves have B leading rows.
      batch_size: B.
      bos_id: the first decoder input: one id, or ``[B]`` ids (a prompt's last token each).
      eos_id: the end-of-sequence id.
      max_len: static T, the width of the output and the most steps taken.
      max_lengths: optional ``[B]`` int per-sentence limits (capped at ``max_len``).

    Returns:
      ``(ids [B, T] int32, lengths [B] int32)``: each row ends with EOS (forced at the row's
      length limit), then 0s; ``lengths`` counts the tokens up to and including EOS.
    """
    return _decode(
        tokens_to_logits,
        cache,
        lambda logits, _: jnp.argmax(logits, axis=-1).astype(jnp.int32),
        None,
        batch_size=batch_size,
        bos_id=bos_id,
        eos_id=eos_id,
        max_len=max_len,
        max_lengths=max_lengths,
    )


def sample(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    rng: jax.Array,
    *,
    batch_size: int,
    bos_id: int | jax.Array,
    eos_id: int,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_lengths: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draws each next token from the model's (reshaped) distribution.

    The logits are divided by ``temperature``, then cut to the ``top_k`` most probable tokens,
    then to the nucleus: the fewest most-probable tokens whose probability (after temperature
    and top-k) sums to at least ``top_p``. Padding is never drawn. The same ``rng`` gives the
    same samples.

    Args:
      tokens_to_logits, cache, batch_size, bos_id, eos_id, max_len, max_lengths: as in
        ``greedy_search``.
      rng: a JAX PRNG key.
      temperature: > 0; static (a Python float). Near 0 this becomes greedy search.
      top_k: keep this many tokens (ties with the k-th included); 0 keeps all. Static.
      top_p: in (0, 1]; 1 keeps all. Static.

    Returns:
      ``(ids [B, T] int32, lengths [B] int32)`` as in ``greedy_search``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def choose(logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / temperature
        if top_k > 0:
            logits = top_k_filter(logits, top_k)
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    return _decode(
        tokens_to_logits,
        cache,
        choose,
        rng,
        batch_size=batch_size,
        bos_id=bos_id,
        eos_id=eos_id,
        max_len=max_len,
        max_lengths=max_lengths,
    )


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Sets all but the ``k`` largest of ``logits [B, V]`` to -inf (ties with the k-th stay)."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the nucleus of ``logits [B, V]``: the fewest top tokens with probability >= ``p``.

    The most probable token always stays; ties with the last nucleus token stay too.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # A token joins while the more probable ones hold less than p; the first one always does.
    kept = (mass_before < p).at[..., 0].set(True)
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _decode(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    choose: Chooser,
    rng: jax.Array | None,
    *,
    batch_size: int,
    bos_id: int | jax.Array,
    eos_id: int,
    max_len: int,
    max_lengths: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """The loop behind greedy search and sampling: ``choose`` picks each row's next token.

    ``rng`` is split once per step, or None where ``choose`` needs no randomness.
    """
    check_cache(cache, batch_size)
    limits = length_limits(max_lengths, batch_size, max_len)
    init = {
        "i": jnp.array(0, jnp.int32),
        "cache": cache,
        "last": jnp.full((batch_size,), bos_id, jnp.int32),
        "out": jnp.zeros((batch_size, max_len), jnp.int32),
        "done": jnp.zeros((batch_size,), bool),
        "rng": rng,
    }

    def cond(state):
        return (state["i"] < max_len) & ~jnp.all(state["done"])

    def body(state):
        i, rng, done = state["i"], state["rng"], state["done"]
        logits, cache = tokens_to_logits(state["last"][:, None], state["cache"])
        at_limit = i + 1 >= limits
        logits = restrict_tokens(logits.astype(jnp.float32), at_limit, eos_id, -jnp.inf)
        key = None
        if rng is not None:
            rng, key = jax.random.split(rng)
        token = choose(logits, key)
        # Forced outright, not only through the logits, in case the model gives EOS -inf.
        token = jnp.where(at_limit, eos_id, token)
        token = jnp.where(done, PAD_ID, token)
        out = jax.lax.dynamic_update_slice(state["out"], token[:, None], (0, i))
        return {"i": i + 1, "cache": cache, "last": token, "out": out,
                "done": done | (token == eos_id), "rng": rng}  # fmt: skip

    out = while_growing(cond, body, init)["out"]
    return out, jnp.sum(out != PAD_ID, axis=-1).astype(jnp.int32)
