"""Decoding a real (tiny, random) Transformer: the cached path equals re-running the prefix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from decoding import beam_search, cached_decoder, greedy_search, uncached_decoder
from model import Transformer, TransformerConfig

PAD, EOS, BOS = 0, 1, 2
VOCAB = 16
MAX_LEN = 10
LIMITS = [MAX_LEN, 3, 8, 6]
ADAPTERS = {"cached": cached_decoder, "uncached": uncached_decoder}


@pytest.fixture(scope="module")
def setup():
    model = Transformer(TransformerConfig.tiny(VOCAB))
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(3, VOCAB, (4, 7)), jnp.int32)
    src = src.at[1, 4:].set(PAD).at[3, 2:].set(PAD)  # padded sources must be masked in both
    # unsafe_rbg: random enough for weights, and compiles in a fraction of threefry's time.
    key = jax.random.key(2, impl="unsafe_rbg")
    variables = nn.unbox(jax.jit(model.init)(key, src, src))
    return model, variables, src


@functools.partial(jax.jit, static_argnames=("model", "adapter"))
def decode_all(model, adapter, variables, src, tgt, max_lengths):
    """Teacher-forced step logits ``[T, B, V]`` for ``tgt``, greedy and beam (n_best 2)."""
    fn, cache = ADAPTERS[adapter](model, variables, src, MAX_LEN)
    common = dict(batch_size=src.shape[0], bos_id=BOS, eos_id=EOS, max_len=MAX_LEN)

    def step(cache, ids):
        logits, cache = fn(ids[:, None], cache)
        return cache, logits

    return {
        "logits": jax.lax.scan(step, cache, tgt.T)[1],
        "greedy": greedy_search(fn, cache, **common, max_lengths=max_lengths),
        "beam": beam_search(fn, cache, **common, max_lengths=max_lengths, n_best=2),
    }


@pytest.fixture(scope="module")
def outputs(setup):
    model, variables, src = setup
    tgt = jnp.asarray(np.random.default_rng(1).integers(3, VOCAB, (4, MAX_LEN)), jnp.int32)
    tgt = tgt.at[:, 0].set(BOS)
    limits = jnp.array(LIMITS)
    # A random model rarely picks EOS. Aligning EOS's (tied) output embedding with the token
    # sentence 0 picks sixth makes it stop on its own, within six steps.
    greedy, _ = decode_all(model, "cached", variables, src, tgt, limits)["greedy"]
    emb = variables["params"]["embed"]["embedding"]
    emb = emb.at[EOS].set(1.05 * emb[int(greedy[0, 5])])
    variables = {"params": {**variables["params"], "embed": {"embedding": emb}}}
    return {a: decode_all(model, a, variables, src, tgt, limits) for a in ADAPTERS}


def check_padded_after_eos(seqs):
    for row in np.asarray(seqs).reshape(-1, MAX_LEN):
        n = list(row).index(EOS) + 1
        assert np.all(row[: n - 1] > PAD) and np.all(row[n:] == PAD), row


def test_step_logits_match_with_and_without_cache(outputs):
    np.testing.assert_allclose(
        outputs["cached"]["logits"], outputs["uncached"]["logits"], atol=1e-5
    )


def test_greedy_is_the_same_with_and_without_cache(outputs):
    ids, lengths = outputs["cached"]["greedy"]
    np.testing.assert_array_equal(ids, outputs["uncached"]["greedy"][0])
    check_padded_after_eos(ids)
    assert np.all(np.asarray(lengths) <= LIMITS)
    assert int(lengths[0]) <= 6 < LIMITS[0]  # a natural EOS, not only forced ones


def test_beam_search_is_the_same_with_and_without_cache(outputs):
    seqs, scores = outputs["cached"]["beam"]
    np.testing.assert_array_equal(seqs, outputs["uncached"]["beam"][0])
    np.testing.assert_allclose(scores, outputs["uncached"]["beam"][1], atol=1e-5)
    check_padded_after_eos(seqs)
    assert np.all(np.isfinite(scores)) and np.all(scores[:, 0] >= scores[:, 1])
    assert np.all((np.asarray(seqs) != PAD).sum(-1) <= np.asarray(LIMITS)[:, None])


def test_long_outputs_across_cache_phases_are_the_same_with_and_without_cache(setup):
    """A cache of 80 positions grows in phases of 32, 64 and 80 (``decoding.cache``); a random
    model rarely stops, so its outputs run through all three."""
    model, variables, src = setup
    length, limits = 80, jnp.array([80, 70, 40, 20])

    @functools.partial(jax.jit, static_argnames="adapter")
    def run(adapter, variables, src):
        fn, cache = ADAPTERS[adapter](model, variables, src, length)
        common = dict(batch_size=4, bos_id=BOS, eos_id=EOS, max_len=length, max_lengths=limits)
        return greedy_search(fn, cache, **common)[0], beam_search(fn, cache, **common, n_best=2)

    (greedy, (seqs, scores)), (greedy_ref, (seqs_ref, scores_ref)) = (
        run(adapter, variables, src) for adapter in ("cached", "uncached")
    )
    np.testing.assert_array_equal(greedy, greedy_ref)
    np.testing.assert_array_equal(seqs, seqs_ref)
    np.testing.assert_allclose(scores, scores_ref, atol=1e-5)
    assert (np.asarray(seqs[:, 0]) != PAD).sum(-1).max() > 64
