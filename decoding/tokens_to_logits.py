"""Adapters from a ``Transformer`` to the searches' ``(tokens_to_logits, initial cache)``.

* ``cached_decoder``: the encoder runs once, ``init_cache`` computes every layer's
  encoder-decoder keys/values once, and each step runs ``decode_step`` on one new token,
  appending its self-attention keys/values to the cache. This is how to decode.
* ``lm_decoder``: the same for a ``DecoderOnlyLM``: the prompt runs through the cache at once
  (all but its last token, which is the searches' first input), then one token per step.
* ``uncached_decoder``: each step writes the new token into a ``[B, L]`` prefix and re-runs the
  whole decoder (``Transformer.decode``) over it, reading the logits at the current position.
  Static shapes mean it always processes all L positions (later ones are padding, invisible to
  earlier ones). It exists to check the cache and to measure what the cache saves.

Call them inside the jitted function, so that ``variables`` and ``src`` are traced:

    @functools.partial(jax.jit, static_argnames="cache_length")
    def translate(variables, src, cache_length):
        tokens_to_logits, cache = cached_decoder(model, variables, src, cache_length)
        return beam_search(tokens_to_logits, cache, batch_size=src.shape[0], bos_id=2,
                           eos_id=1, max_len=cache_length)
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from decoding.cache import Cache, PerSentence, Positions, Slots, TokensToLogits, unwrap
from model.decoder_only import DecoderOnlyLM
from model.transformer import Transformer
from runtime.hardware import resolve_decode_dtype

log = logging.getLogger(__name__)


def for_decoding(model, dtype: str = "auto"):
    """The same model computing in the decoding dtype (``runtime.hardware.resolve_decode_dtype``:
    ``"auto"`` is the training dtype on accelerators and CPUs with AMX, float32 on other CPUs);
    the parameters fit both. Logs the choice and its reason."""
    chosen, reason = resolve_decode_dtype(dtype, model.config.dtype)
    log.info("decoding in %s (%s)", chosen, reason)
    if chosen == model.config.dtype:
        return model
    return type(model)(dataclasses.replace(model.config, dtype=chosen))


def cached_decoder(
    model: Transformer, variables: dict, src: jax.Array, cache_length: int
) -> tuple[TokensToLogits, Cache]:
    """Incremental decoding with the model's key/value cache.

    Args:
      model: the Transformer.
      variables: its variables (``{'params': ...}``).
      src: ``[B, S]`` int32 source ids, 0 = padding.
      cache_length: L, the most target positions (steps) the cache holds.

    Returns:
      ``(tokens_to_logits, cache)``: ``ids [R, 1] -> logits [R, V]`` float32 (R = B x beams),
      and the cache of ``Transformer.init_cache`` with its per-sentence entries (the source
      mask, the encoder-decoder keys/values) marked ``PerSentence`` and its self-attention
      keys/values ``Positions`` (see ``decoding.cache``).
    """
    memory = model.apply(variables, src, method=Transformer.encode)
    cache = model.apply(variables, memory, src, cache_length, method=Transformer.init_cache)

    def tokens_to_logits(ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits, cache = model.apply(variables, ids, unwrap(cache), method=Transformer.decode_step)
        return logits[:, 0].astype(jnp.float32), _mark(cache)

    return tokens_to_logits, _mark(cache)


def _mark(cache: Cache) -> Cache:
    """Marks ``Transformer.init_cache``'s entries for the searches (``decoding.cache``)."""
    layers = tuple(
        {
            # {'k', 'v'} [R, H, L, K]: slot l holds step l of the row that wrote it; the
            # beams find their history through 'beams' [R, L], which follows them.
            "self": {name: Slots(x, axis=2) for name, x in c["self"].items()},
            "cross": {name: PerSentence(x) for name, x in c["cross"].items()},
        }
        for c in cache["layers"]
    )
    return {
        **cache,
        "src_valid": PerSentence(cache["src_valid"]),
        "beams": Positions(cache["beams"], axis=1),
        "layers": layers,
    }


def uncached_decoder(
    model: Transformer, variables: dict, src: jax.Array, cache_length: int
) -> tuple[TokensToLogits, Cache]:
    """Decoding that re-runs the full decoder over the whole prefix at every step.

    Args: as for ``cached_decoder``.

    Returns:
      ``(tokens_to_logits, cache)`` with cache ``{'index': int32 [], 'prefix': [B, L] int32
      decoder inputs so far (0 after them), 'memory': [B, S, D], 'src': [B, S]}``.
    """
    memory = model.apply(variables, src, method=Transformer.encode)
    cache = {
        "index": jnp.array(0, jnp.int32),
        "prefix": jnp.zeros((src.shape[0], cache_length), jnp.int32),
        "memory": memory,
        "src": src,
    }

    def tokens_to_logits(ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        index = cache["index"]
        prefix = jax.lax.dynamic_update_slice(cache["prefix"], ids.astype(jnp.int32), (0, index))
        logits = model.apply(
            variables, cache["memory"], cache["src"], prefix, method=Transformer.decode
        )
        step = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
        return step.astype(jnp.float32), {**cache, "index": index + 1, "prefix": prefix}

    return tokens_to_logits, cache


def lm_decoder(
    model: DecoderOnlyLM, variables: dict, prompts: jax.Array, length: int
) -> tuple[TokensToLogits, Cache, jax.Array]:
    """Continuing prompts with a decoder-only LM, through the same search functions.

    Args:
      model: the DecoderOnlyLM.
      variables: its variables.
      prompts: ``[B, P]`` int32 prompts of one length P >= 1, BOS first (no padding).
      length: L, the cache's positions: P plus the most new tokens (<= ``config.max_positions``).

    Returns:
      ``(tokens_to_logits, cache, first_ids)``: the cache already holds the first P - 1 prompt
      positions, and ``first_ids [B]`` (the prompts' last tokens) is the searches' ``bos_id``.
    """
    cache = model.apply(variables, prompts.shape[0], length, method=DecoderOnlyLM.init_cache)
    if prompts.shape[1] > 1:
        _, cache = model.apply(variables, prompts[:, :-1], cache, method=DecoderOnlyLM.decode_step)

    def tokens_to_logits(ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        logits, cache = model.apply(variables, ids, cache, method=DecoderOnlyLM.decode_step)
        return logits[:, 0].astype(jnp.float32), cache

    return tokens_to_logits, cache, prompts[:, -1]
