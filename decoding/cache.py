"""Pieces shared by the search functions: the cache contract, length limits, forbidden tokens.

Every search drives a ``tokens_to_logits(ids [R, 1] int32, cache) -> (logits [R, V], cache)``
function, R = B sentences x W beams (W = 1 for greedy search and sampling; row ``b * W + j`` is
beam j of sentence b). The cache is any pytree whose leaves are one of:

* an array with ndim >= 1: one row per decoder row; a beam search repeats it W times
  (``tile``) and reorders its rows to follow the surviving beams after every step;
* a 0-d array (a step index): shared by all rows;
* ``PerSentence(array)``: one row per sentence, shared by its beams, never copied or
  reordered (the encoder memory's keys and values: ``tokens_to_logits`` reads W from the
  ratio of rows). Reordering is a gather of every per-row byte at every step, so what need
  not follow the beams should not be per row.
* ``Positions(array, axis)``: a per-row entry with one slot per step along ``axis`` (the
  self-attention keys and values), empty when the search starts, slot i written by step i.
  The searches run in phases (``while_growing``): the slots are cut to 32 at first and
  doubled (zero-padded) whenever the steps reach their end, up to the entry's own length.
  Attention and beam reordering read every slot at every step, so their cost follows the
  length decoded so far instead of the longest allowed.
* ``Slots(array, axis)``: like ``Positions``, but never reordered: slot l of row r is written
  once, by row r at step l, and the model reads each hypothesis's history through a per-row
  table that does follow the beams (the Transformer's self-attention keys and values and its
  ``'beams'`` entry). Reordering the whole cache at every step was a fifth of the beam
  search's time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Cache = Any
TokensToLogits = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]

PAD_ID = 0  # Outputs are padded with 0 after EOS, so the searches never emit it.

# Large but finite: sums of a few of these stay finite in float32 (no inf - inf = nan), and any
# score below NEG_INF / 2 marks a hypothesis that does not exist.
NEG_INF = -1.0e30


@jax.tree_util.register_pytree_node_class
class PerSentence:
    """A cache entry with one row per sentence, shared by the sentence's beams."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class Positions:
    """A per-row cache entry whose ``axis`` holds one slot per step (see the module docstring)."""

    def __init__(self, value, axis: int):
        self.value, self.axis = value, axis

    def tree_flatten(self):
        return (self.value,), self.axis

    @classmethod
    def tree_unflatten(cls, axis, children):
        return cls(children[0], axis)


@jax.tree_util.register_pytree_node_class
class Slots(Positions):
    """A per-row cache entry with one slot per step that stays in place when beams reorder
    (see the module docstring)."""


def _is_entry(x) -> bool:
    return isinstance(x, (PerSentence, Positions))


def map_rows(fn: Callable[[jax.Array], jax.Array], cache: Cache, *, slots: bool = True) -> Cache:
    """Applies ``fn`` to every per-row leaf (ndim >= 1, ``Positions`` included, and ``Slots``
    if ``slots``); 0-d leaves and ``PerSentence`` entries are kept as they are."""

    def apply(x):
        if isinstance(x, Positions):
            if isinstance(x, Slots) and not slots:
                return x
            return type(x)(fn(x.value), x.axis)
        if isinstance(x, PerSentence) or jnp.ndim(x) == 0:
            return x
        return fn(x)

    return jax.tree.map(apply, cache, is_leaf=_is_entry)


def tile(cache: Cache, n: int) -> Cache:
    """Repeats every per-row leaf n times along its rows: ``[B, ...] -> [B*n, ...]``."""
    return map_rows(lambda x: jnp.repeat(x, n, axis=0), cache)


def reorder(cache: Cache, rows: jax.Array) -> Cache:
    """Row ``r`` of every per-row leaf becomes its row ``rows[r]`` (beams following parents);
    ``Slots`` entries stay where they are."""
    return map_rows(lambda x: x[rows], cache, slots=False)


def select(cache: Cache, rows: jax.Array, sentences: jax.Array) -> Cache:
    """The cache of some sentences only: per-row leaves keep ``rows``, ``PerSentence`` entries
    keep ``sentences`` (0-d leaves are shared)."""

    def apply(x):
        if isinstance(x, PerSentence):
            return PerSentence(x.value[sentences])
        if isinstance(x, Positions):
            return type(x)(x.value[rows], x.axis)
        return x if jnp.ndim(x) == 0 else x[rows]

    return jax.tree.map(apply, cache, is_leaf=_is_entry)


def unwrap(cache: Cache) -> Cache:
    """The cache with its ``PerSentence`` and ``Positions`` entries replaced by their arrays."""
    return jax.tree.map(lambda x: x.value if _is_entry(x) else x, cache, is_leaf=_is_entry)


def _positions(cache: Cache) -> list[Positions]:
    return [x for x in jax.tree.leaves(cache, is_leaf=_is_entry) if isinstance(x, Positions)]


def resize(cache: Cache, slots: int) -> Cache:
    """Every ``Positions`` (and ``Slots``) entry cut or zero-padded to ``slots`` slots
    (cutting drops slots, so only empty ones may be cut)."""

    def apply(x):
        if not isinstance(x, Positions):
            return x
        have = x.value.shape[x.axis]
        if have >= slots:
            return type(x)(jax.lax.slice_in_dim(x.value, 0, slots, axis=x.axis), x.axis)
        pad = [(0, 0)] * x.value.ndim
        pad[x.axis] = (0, slots - have)
        return type(x)(jnp.pad(x.value, pad), x.axis)

    return jax.tree.map(apply, cache, is_leaf=_is_entry)


FIRST_SLOTS = 32  # The first phase's slots; long enough that short outputs never grow.


def phase_slots(slots: int) -> list[int]:
    """The slot counts of the phases for entries of ``slots`` slots: 32, 64, ..., ``slots``."""
    phases, n = [], FIRST_SLOTS
    while n < slots:
        phases.append(n)
        n *= 2
    return [*phases, slots]


def while_growing(cond: Callable, body: Callable, state: dict) -> dict:
    """``lax.while_loop(cond, body, state)`` for a state with step ``'i'`` (0 at the start) and
    ``'cache'``, run in phases that grow the cache's ``Positions`` entries with the steps.

    Each phase is its own loop over a cache of fixed shape; it ends when ``cond`` does or when
    step i has no slot left, and the next phase pads the slots and goes on, so the steps and
    their results are exactly those of one loop over the full-length cache.
    """
    entries = _positions(state["cache"])
    if not entries:
        return jax.lax.while_loop(cond, body, state)
    lengths = {x.value.shape[x.axis] for x in entries}
    if len(lengths) != 1:
        raise ValueError(f"Positions entries must share one length, got {sorted(lengths)}")
    for slots in phase_slots(lengths.pop()):
        state = {**state, "cache": resize(state["cache"], slots)}
        state = jax.lax.while_loop(lambda s, n=slots: cond(s) & (s["i"] < n), body, state)
    return state


def check_cache(cache: Cache, batch_size: int) -> None:
    """Raises ValueError unless every non-scalar cache leaf has ``batch_size`` leading rows."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(unwrap(cache)):
        if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] != batch_size:
            raise ValueError(
                f"cache leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; expected "
                f"batch_size={batch_size} leading rows (0-d leaves are shared by all rows)"
            )


def length_limits(max_lengths: jax.Array | None, batch_size: int, max_len: int) -> jax.Array:
    """Per-sentence output length limits ``[B]`` int32, EOS included, capped at ``max_len``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if max_lengths is None:
        return jnp.full((batch_size,), max_len, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    if max_lengths.shape != (batch_size,):
        raise ValueError(f"max_lengths has shape {max_lengths.shape}; expected ({batch_size},)")
    return jnp.clip(max_lengths, 1, max_len)


def restrict_tokens(
    log_probs: jax.Array, at_limit: jax.Array, eos_id: int, fill: float = NEG_INF
) -> jax.Array:
    """Forbids padding everywhere and everything but EOS where a row is at its length limit.

    Forcing EOS at the limit (as fairseq does) means every output ends with EOS and its score
    includes the model's probability of stopping there.

    Args:
      log_probs: ``[B, V]`` log-probabilities or logits.
      at_limit: ``[B]`` bool, True where the next token is the last one allowed.
      eos_id: the end-of-sequence id.
      fill: the value of forbidden entries.

    Returns:
      ``[B, V]``, with forbidden entries set to ``fill``.
    """
    vocab = jnp.arange(log_probs.shape[-1])
    allowed = (vocab != PAD_ID)[None, :] & (~at_limit[:, None] | (vocab == eos_id)[None, :])
    return jnp.where(allowed, log_probs, fill)
