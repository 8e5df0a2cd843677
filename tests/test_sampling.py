"""Greedy search and sampling on first-order Markov chains whose distributions we control.

``tokens_to_logits`` returns ``cache['tables'][b, last]``: the logits of the next token given
the last one, from sentence b's own table. Ids: 0 pad, 1 EOS, 2 BOS, 3.. others.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import greedy_search, sample, top_k_filter, top_p_filter

PAD, EOS, BOS = 0, 1, 2
NUCLEUS = {3: 0.5, 4: 0.3, 5: 0.15, 6: 0.05}  # next-token probabilities after any token
# At temperature 2 the probabilities become sqrt(p) / 1.866 = 0.379, 0.294, 0.207, 0.120, so
# the 0.5 nucleus is tokens 3 and 4.
HOT_NUCLEUS = 0.5**0.5 + 0.3**0.5


def tokens_to_logits(ids, cache):
    rows = jnp.arange(ids.shape[0])
    return cache["tables"][rows, ids[:, 0]], {**cache, "index": cache["index"] + 1}


def chain(tables):
    """The initial cache: the tables travel in it, so one compiled search serves all tests."""
    return {"index": jnp.array(0, jnp.int32), "tables": jnp.asarray(tables, jnp.float32)}


STATIC = ("batch_size", "bos_id", "eos_id", "max_len", "temperature", "top_k", "top_p")
_greedy = jax.jit(functools.partial(greedy_search, tokens_to_logits), static_argnames=STATIC[:4])
_sample = jax.jit(functools.partial(sample, tokens_to_logits), static_argnames=STATIC)


def run_greedy(tables, max_len=12, max_lengths=None):
    batch = dict(batch_size=tables.shape[0], bos_id=BOS, eos_id=EOS, max_len=max_len)
    return _greedy(chain(tables), **batch, max_lengths=max_lengths)


def run_sample(tables, key, **settings):
    batch = dict(batch_size=tables.shape[0], bos_id=BOS, eos_id=EOS, max_len=12)
    return _sample(chain(tables), key, **batch, **settings)


def fixed_distribution(probs: dict[int, float], batch: int, vocab: int = 8) -> np.ndarray:
    """Tables in which every token is followed by ``probs`` (others, EOS included, ~never)."""
    row = np.full(vocab, np.log(1e-12))
    for tok, p in probs.items():
        row[tok] = np.log(p)
    return np.broadcast_to(row, (batch, vocab, vocab)).copy()


def random_tables(seed=0, batch=16, vocab=9):
    return np.random.default_rng(seed).normal(0, 2.0, (batch, vocab, vocab))


def greedy_reference(tables, max_len):
    """Greedy decoding in plain numpy: argmax over all tokens but padding, EOS at max_len."""
    out = np.zeros((tables.shape[0], max_len), np.int64)
    for b, table in enumerate(tables):
        last = BOS
        for i in range(max_len):
            last = EOS if i == max_len - 1 else int(np.argmax(table[last, 1:])) + 1
            out[b, i] = last
            if last == EOS:
                break
    return out


def token_counts(ids, vocab=8):
    return np.bincount(np.asarray(ids).ravel(), minlength=vocab)


def test_greedy_follows_the_argmax_and_pads_after_eos():
    tables = random_tables()
    tables[:, :, PAD] = 10.0  # the most likely token, yet never emitted
    ids, lengths = run_greedy(tables)
    expected = greedy_reference(tables, 12)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(lengths, (expected != PAD).sum(1))
    assert len(set(np.asarray(lengths))) > 2  # EOS at several positions


def test_greedy_forces_eos_at_each_sentence_limit():
    tables = fixed_distribution(NUCLEUS, 3)
    ids, lengths = run_greedy(tables, 6, jnp.array([1, 4, 20]))
    np.testing.assert_array_equal(lengths, [1, 4, 6])
    np.testing.assert_array_equal(ids[1], [3, 3, 3, EOS, PAD, PAD])
    np.testing.assert_array_equal(ids[0], [EOS] + [PAD] * 5)


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1e-4), dict(top_k=1, temperature=5.0), dict(top_p=1e-6)],
    ids=["cold", "top1-hot", "tiny-nucleus"],
)
def test_degenerate_sampling_is_greedy(settings):
    tables = random_tables(seed=1)
    greedy, _ = run_greedy(tables)
    ids, _ = run_sample(tables, jax.random.key(3), **settings)
    np.testing.assert_array_equal(ids, greedy)


def test_same_key_same_samples_other_key_others():
    tables = random_tables(seed=2)
    a, len_a = run_sample(tables, jax.random.key(0))
    b, len_b = run_sample(tables, jax.random.key(0))
    c, _ = run_sample(tables, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(len_a, len_b)
    assert not np.array_equal(a, c)
    # Every sample ends with its one EOS, then padding.
    for row, n in zip(np.asarray(a), np.asarray(len_a), strict=True):
        assert row[n - 1] == EOS and np.all(row[: n - 1] > EOS) and np.all(row[n:] == PAD)


# 512 rows x 11 free steps = 5632 draws per case: 5 standard deviations of a frequency are
# at most 5 * sqrt(0.25 / 5632) = 0.033.
@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(), NUCLEUS),
        (dict(top_p=0.7), {3: 0.5 / 0.8, 4: 0.3 / 0.8}),  # 0.5 < 0.7 <= 0.5 + 0.3
        (dict(top_k=2), {3: 0.5 / 0.8, 4: 0.3 / 0.8}),
        # Temperature 2 flattens p to sqrt(p) before the nucleus is taken.
        (dict(temperature=2.0, top_p=0.5), {3: 0.5**0.5 / HOT_NUCLEUS, 4: 0.3**0.5 / HOT_NUCLEUS}),
    ],
    ids=["plain", "top-p-0.7", "top-k-2", "hot-top-p"],
)
def test_sampled_frequencies_follow_the_filtered_distribution(settings, expected):
    tables = fixed_distribution(NUCLEUS, 512)
    ids, lengths = run_sample(tables, jax.random.key(42), **settings)
    assert np.all(np.asarray(lengths) == 12)  # EOS has ~0 probability until it is forced
    counts = token_counts(np.asarray(ids)[:, :-1])
    freqs = counts / counts.sum()
    for tok in range(8):
        if tok not in expected:
            assert counts[tok] == 0, (tok, counts)
        else:
            assert freqs[tok] == pytest.approx(expected[tok], abs=0.033), (tok, freqs)


def test_filters_on_known_logits():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda x: np.isfinite(np.asarray(x[0]))
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.75)), [0, 1, 0, 1])
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.85)), [0, 1, 1, 1])
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.1)), [0, 1, 0, 0])
    np.testing.assert_array_equal(kept(top_k_filter(logits, 3)), [0, 1, 1, 1])
    ties = jnp.array([[1.0, 2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(kept(top_k_filter(ties, 1)), [0, 1, 1, 0])


def test_rejects_bad_settings():
    cache = chain(random_tables())
    common = dict(batch_size=16, bos_id=BOS, eos_id=EOS, max_len=4)
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample(tokens_to_logits, cache, jax.random.key(0), **common, **bad)
