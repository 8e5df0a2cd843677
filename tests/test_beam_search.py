"""Beam search against brute-force enumeration on small Markov chains with known best paths.

The "model" is a second-order Markov chain: the next token's logits are
``tables[row, prev, last]``, where ``last`` is the input id and ``prev`` the token before it,
kept in the cache. So the search must reorder the cache by parent beam to score correctly, and
each sentence (``row``) has its own chain. Ids: 0 pad, 1 EOS, 2 BOS, 3.. others.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding import beam_search, greedy_search
from decoding.beam_search import STOPPING, blocked_top_k
from decoding.cache import NEG_INF, Positions, Slots, reorder, resize, select, tile, while_growing

PAD, EOS, BOS = 0, 1, 2


def chain(tables, rows):
    """``(tokens_to_logits, cache)`` for the chains ``tables [R, V, V, V]``, one row each."""
    tables = jnp.asarray(tables, jnp.float32)

    def tokens_to_logits(ids, cache):
        last = ids[:, 0]
        logits = tables[cache["row"], cache["prev"], last]
        return logits, {"index": cache["index"] + 1, "prev": last, "row": cache["row"]}

    rows = jnp.asarray(rows, jnp.int32)
    cache = {"index": jnp.array(0, jnp.int32), "prev": jnp.full_like(rows, BOS), "row": rows}
    return tokens_to_logits, cache


def first_order(probs_by_last: dict[int, dict[int, float]], vocab: int) -> np.ndarray:
    """A ``[1, V, V, V]`` table from next-token probabilities per last token (rest ~0)."""
    table = np.full((vocab, vocab), np.log(1e-9))
    for last, probs in probs_by_last.items():
        for tok, p in probs.items():
            table[last, tok] = np.log(p)
    return np.broadcast_to(table[None, :, :], (vocab, vocab, vocab))[None].copy()


def brute_force(table, max_n, alpha):
    """All outputs of length <= max_n (EOS last, never pad), best first: [(score, ids)]."""
    logp = log_probs(table)
    others = [t for t in range(table.shape[-1]) if t not in (PAD, EOS)]
    found = []
    for n in range(1, max_n + 1):
        for prefix in itertools.product(others, repeat=n - 1):
            ids = (*prefix, EOS)
            found.append((score_of(logp, ids, alpha), ids))
    return sorted(found, key=lambda x: -x[0])


def log_probs(table):
    """The chain's next-token log-probabilities, ``[V, V, V]``."""
    return np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32), axis=-1))


def score_of(logp, ids, alpha):
    """One output's GNMT-penalised log-probability under ``logp = log_probs(table)``."""
    total, prev, last = 0.0, BOS, BOS
    for tok in ids:
        total += logp[prev, last, tok]
        prev, last = last, tok
    return total / ((5 + len(ids)) / 6) ** alpha


# alpha may be traced: one compilation serves every alpha.
@functools.partial(
    jax.jit,
    static_argnames=("batch_size", "beam_size", "max_len", "n_best", "stopping", "shrink"),
)
def run_beam(tables, rows, max_lengths=None, **kwargs):
    fn, cache = chain(tables, rows)
    return beam_search(fn, cache, bos_id=BOS, eos_id=EOS, max_lengths=max_lengths, **kwargs)


def ids_of(row):
    """The tokens of one output row, up to and including EOS."""
    row = list(np.asarray(row))
    return tuple(row[: row.index(EOS) + 1])


# Greedy takes a (0.55) and then EOS: 0.55 * 0.3 = 0.165; the best output is b EOS: 0.405.
GREEDY_TRAP = {
    BOS: {3: 0.55, 4: 0.45},
    3: {EOS: 0.3, 3: 0.25, 4: 0.25, 5: 0.2},
    4: {EOS: 0.9, 3: 0.05, 5: 0.05},
    5: {EOS: 0.5, 3: 0.5},
}
# Without a length penalty EOS alone (0.4) wins over a b EOS (0.6 * 0.97 * 0.63 = 0.367);
# with alpha = 0.6 the longer one wins: -1.003 / lp(3) = -0.844 > -0.916.
PENALTY_FLIP = {
    BOS: {EOS: 0.4, 3: 0.6},
    3: {4: 0.97, EOS: 0.01, 3: 0.02},
    4: {EOS: 0.63, 3: 0.37},
}


def test_finds_the_best_output_where_greedy_does_not():
    table = first_order(GREEDY_TRAP, 6)
    best = brute_force(table[0], 6, 0.6)[0]
    seqs, scores = run_beam(table, [0], batch_size=1, max_len=6)  # beam 4, alpha 0.6
    assert ids_of(seqs[0, 0]) == best[1] == (4, EOS)
    np.testing.assert_allclose(scores[0, 0], best[0], rtol=1e-5)
    fn, cache = chain(table, [0])
    greedy, lengths = jax.jit(
        lambda c: greedy_search(fn, c, batch_size=1, bos_id=BOS, eos_id=EOS, max_len=6)
    )(cache)
    assert ids_of(greedy[0]) == (3, EOS) and int(lengths[0]) == 2


def test_length_penalty_changes_the_winner():
    table = first_order(PENALTY_FLIP, 5)
    winners = {}
    for alpha in (0.0, 0.6):
        best = brute_force(table[0], 5, alpha)[0]
        seqs, scores = run_beam(table, [0], batch_size=1, alpha=alpha, max_len=5)
        assert ids_of(seqs[0, 0]) == best[1]
        np.testing.assert_allclose(scores[0, 0], best[0], rtol=1e-5)
        winners[alpha] = best[1]
    assert winners == {0.0: (EOS,), 0.6: (3, 4, EOS)}


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_exhaustive_beam_returns_the_brute_force_n_best(alpha):
    # V = 5 leaves 3 tokens besides pad and EOS: at most 4 * 3**2 = 36 extensions per step for
    # outputs of up to 4 tokens, so a beam of 40 keeps everything and must be exact.
    rng = np.random.default_rng(0)
    tables = rng.normal(0, 2.0, (3, 5, 5, 5))
    limits = [4, 2, 3]
    seqs, scores = run_beam(
        tables, [0, 1, 2], jnp.array(limits), batch_size=3, beam_size=40, alpha=alpha,
        max_len=4, n_best=6,
    )  # fmt: skip
    for b, limit in enumerate(limits):
        expected = brute_force(tables[b], limit, alpha)[:6]
        n = len(expected)  # a limit of 2 allows only 4 outputs: EOS, or one of 3 tokens + EOS
        assert [ids_of(s) for s in seqs[b, :n]] == [ids for _, ids in expected]
        np.testing.assert_allclose(scores[b, :n], [s for s, _ in expected], rtol=1e-5)
        assert np.all(scores[b, n:] == -np.inf) and np.all(np.asarray(seqs[b, n:]) == PAD)
        assert all(len(ids_of(s)) <= limit for s in seqs[b, :n])
        assert np.all(np.diff(scores[b, :n]) <= 0)


def test_default_beam_n_best_is_sorted_and_scored_exactly():
    # With beam 4 the returned outputs need not be the global top 4, but each score must be its
    # sequence's exact length-penalised log-probability, best first.
    rng = np.random.default_rng(1)
    tables = rng.normal(0, 2.0, (2, 6, 6, 6))
    seqs, scores = run_beam(tables, [0, 1], batch_size=2, max_len=5, n_best=4)
    for b in range(2):
        exact = dict((ids, s) for s, ids in brute_force(tables[b], 5, 0.6))
        got = [ids_of(s) for s in seqs[b]]
        assert len(set(got)) == 4
        np.testing.assert_allclose(scores[b], [exact[ids] for ids in got], rtol=1e-5)
        assert np.all(np.diff(scores[b]) <= 0)
        assert got[0] == brute_force(tables[b], 5, 0.6)[0][1]


def test_per_sentence_limits_force_eos_and_pad_after_it():
    # A chain that never wants to stop: each output ends with EOS exactly at its limit.
    never_stop = first_order({t: {3: 0.5, 4: 0.5 - 1e-6, EOS: 1e-6} for t in (BOS, 3, 4)}, 5)
    seqs, scores = run_beam(
        np.repeat(never_stop, 3, 0), [0, 1, 2], jnp.array([1, 3, 9]), batch_size=3, max_len=6
    )
    lengths = [len(ids_of(s)) for s in seqs[:, 0]]
    assert lengths == [1, 3, 6]  # the last limit is capped by max_len
    for row, n in zip(seqs[:, 0], lengths, strict=True):
        assert np.all(np.asarray(row[: n - 1]) > EOS) and np.all(np.asarray(row[n:]) == PAD)
    assert np.all(np.isfinite(scores))


def test_fewer_possible_outputs_than_n_best_are_minus_inf():
    tables = np.random.default_rng(2).normal(size=(1, 5, 5, 5))
    seqs, scores = run_beam(tables, [0], jnp.array([1]), batch_size=1, max_len=3, n_best=2)
    assert ids_of(seqs[0, 0]) == (EOS,) and np.isfinite(scores[0, 0])
    assert scores[0, 1] == -np.inf and np.all(np.asarray(seqs[0, 1]) == PAD)


def test_beam_of_one_without_penalty_is_greedy():
    tables = np.random.default_rng(3).normal(0, 2.0, (8, 7, 7, 7))
    fn, cache = chain(tables, np.arange(8))
    greedy, _ = jax.jit(
        lambda c: greedy_search(fn, c, batch_size=8, bos_id=BOS, eos_id=EOS, max_len=10)
    )(cache)
    seqs, _ = run_beam(tables, np.arange(8), batch_size=8, beam_size=1, alpha=0.0, max_len=10)
    np.testing.assert_array_equal(seqs[:, 0], greedy)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_stops_early_once_no_live_beam_can_win(alpha):
    steps = []
    table = jnp.asarray(first_order(GREEDY_TRAP, 6), jnp.float32)
    inner, cache = chain(table, [0])

    def counting(ids, cache):
        jax.debug.callback(lambda: steps.append(1))
        return inner(ids, cache)

    seqs, _ = jax.jit(
        lambda c: beam_search(
            counting, c, batch_size=1, alpha=alpha, bos_id=BOS, eos_id=EOS, max_len=100
        )
    )(cache)
    jax.effects_barrier()
    assert ids_of(seqs[0, 0]) == (4, EOS)
    # Without a penalty b EOS (log 0.405) settles it after step 2: every live log-probability is
    # already lower. With it, the bound divides by lp(100) ~ 5.6, and as each live hypothesis
    # loses >= log 2 per step, it takes a few more steps, still far below 100.
    assert len(steps) == 2 if alpha == 0.0 else 2 < len(steps) <= 12


# Two outputs finish by step 2 (EOS, then 3 EOS), while 3 4 5 ... 9 EOS, as likely as 3 EOS,
# wins by its length with alpha = 1: -1.386 / lp(9) = -0.594 > -0.693 for EOS alone.
LONG_WINNER = {BOS: {EOS: 0.5, 3: 0.5}, 3: {EOS: 0.5, 4: 0.5}}
LONG_WINNER.update({t: {t + 1: 1.0} for t in range(4, 9)})
LONG_WINNER[9] = {EOS: 1.0}


def test_count_stopping_ends_at_w_finished_where_exact_searches_on():
    table = jnp.asarray(first_order(LONG_WINNER, 10), jnp.float32)
    inner, cache = chain(table, [0])
    found = {}
    for stopping in ("exact", "count"):
        steps = []

        def counting(ids, cache, steps=steps):
            jax.debug.callback(lambda: steps.append(1))
            return inner(ids, cache)

        seqs, scores = jax.jit(
            lambda c, s=stopping: beam_search(
                counting, c, batch_size=1, beam_size=2, alpha=1.0, bos_id=BOS, eos_id=EOS,
                max_len=20, n_best=2, stopping=s,
            )
        )(cache)  # fmt: skip
        jax.effects_barrier()
        found[stopping] = ([ids_of(s) for s in seqs[0]], len(steps))
        expected = [score_of(log_probs(table[0]), ids, 1.0) for ids in found[stopping][0]]
        np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    assert found["count"] == ([(EOS,), (3, EOS)], 2)
    assert found["exact"][0] == [(3, 4, 5, 6, 7, 8, 9, EOS), (EOS,)]
    assert found["exact"][1] >= 8  # the winner ends at step 8


def test_unknown_stopping_rule_is_refused():
    with pytest.raises(ValueError, match="stopping must be one of exact, count, got 'never'"):
        run_beam(first_order(GREEDY_TRAP, 6), [0], batch_size=1, max_len=6, stopping="never")


def test_rejects_a_cache_without_batch_rows():
    fn, cache = chain(first_order(GREEDY_TRAP, 6), [0, 0])
    with pytest.raises(ValueError, match="batch_size=3"):
        beam_search(fn, cache, batch_size=3, bos_id=BOS, eos_id=EOS, max_len=4)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(fn, cache, batch_size=2, bos_id=BOS, eos_id=EOS, max_len=4, n_best=5)


@pytest.mark.parametrize("n, k", [(32000, 8), (1000, 8), (130, 2), (300, 8)])
def test_blocked_top_k_equals_top_k_ties_included(n, k):
    rng = np.random.default_rng(n)
    x = np.round(rng.normal(size=(5, n)) * 2) / 2  # many ties
    x[1] = -np.inf  # a row with nothing but -inf
    x[2, ::7] = NEG_INF
    x[3, -5:] = 9.0  # the best entries in the last, partial block
    x = jnp.asarray(x, jnp.float32)
    values, indices = jax.jit(blocked_top_k, static_argnums=1)(x, k)
    expected = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(values, expected[0])
    np.testing.assert_array_equal(indices, expected[1])


def history_chain(tables, rows, length, positions):
    """``chain`` whose logits also depend on every earlier token, kept in a ``[R, length]``
    history (slot i = step i's input), marked ``Positions`` when ``positions``."""
    tables = jnp.asarray(tables, jnp.float32)
    weights = jnp.arange(1, length + 1, dtype=jnp.int32)  # integer sums: exact in any order

    def tokens_to_logits(ids, cache):
        hist = cache["hist"].value if positions else cache["hist"]
        hist = jax.lax.dynamic_update_slice(hist, ids, (0, cache["index"]))
        past = jnp.sum(weights[: hist.shape[1]] * hist, axis=1)  # zero-padded slots add 0
        vocab = jnp.arange(1, tables.shape[-1] + 1, dtype=jnp.float32)
        logits = tables[cache["row"], ids[:, 0]] + jnp.sin(past[:, None] * vocab)
        return logits, {
            "index": cache["index"] + 1,
            "row": cache["row"],
            "hist": Positions(hist, axis=1) if positions else hist,
        }

    rows = jnp.asarray(rows, jnp.int32)
    hist = jnp.zeros((rows.shape[0], length), jnp.int32)
    return tokens_to_logits, {
        "index": jnp.array(0, jnp.int32),
        "row": rows,
        "hist": Positions(hist, axis=1) if positions else hist,
    }


def test_growing_the_cache_in_phases_changes_nothing():
    length = 80  # phases of 32, 64 and 80 slots
    rng = np.random.default_rng(3)
    tables = np.log(rng.dirichlet(np.full(7, 0.5), size=(4, 7)))
    tables[..., EOS] -= 4.0  # long outputs, so that the steps cross both phase ends
    outputs = {}
    for positions in (False, True):

        def run(tables, positions=positions):
            fn, cache = history_chain(tables, np.arange(4), length, positions)
            kw = dict(batch_size=4, bos_id=BOS, eos_id=EOS, max_len=length)
            limits = jnp.array([80, 70, 40, 33])
            return (
                beam_search(fn, cache, **kw, max_lengths=limits, n_best=2, shrink=False),
                greedy_search(fn, cache, **kw, max_lengths=limits),
            )

        outputs[positions] = jax.jit(run)(tables)
        loops = str(jax.make_jaxpr(run)(tables)).count("while[")
        assert loops == (6 if positions else 2)  # three phases for each search
    (beam, greedy), (beam_grown, greedy_grown) = outputs[False], outputs[True]
    np.testing.assert_array_equal(beam[0], beam_grown[0])
    np.testing.assert_array_equal(beam[1], beam_grown[1])
    np.testing.assert_array_equal(greedy[0], greedy_grown[0])
    lengths = (np.asarray(beam[0][:, 0]) != PAD).sum(-1)
    assert lengths.max() > 64 and lengths.min() <= 33, lengths


def test_slots_stay_in_place_while_positions_and_rows_follow_the_beams():
    # Slots entries are written once per row and step and read through a table that follows
    # the beams, so reordering must leave them alone; tiling, selecting and resizing must not.
    cache = {
        "slots": Slots(jnp.arange(6).reshape(2, 3), axis=1),
        "table": Positions(jnp.arange(6).reshape(2, 3) + 10, axis=1),
        "row": jnp.array([7, 8]),
        "step": jnp.array(5),
    }
    tiled = tile(cache, 2)  # rows 0, 0, 1, 1
    assert isinstance(tiled["slots"], Slots) and tiled["slots"].value.shape == (4, 3)
    rows = jnp.array([1, 0, 3, 3])
    moved = reorder(tiled, rows)
    np.testing.assert_array_equal(moved["slots"].value, tiled["slots"].value)
    np.testing.assert_array_equal(moved["table"].value, tiled["table"].value[rows])
    np.testing.assert_array_equal(moved["row"], [7, 7, 8, 8])
    kept = select(moved, jnp.array([2, 3]), jnp.array([1]))
    np.testing.assert_array_equal(kept["slots"].value, [[3, 4, 5], [3, 4, 5]])
    assert isinstance(kept["slots"], Slots) and int(kept["step"]) == 5
    grown = resize(kept, 5)
    assert isinstance(grown["slots"], Slots) and grown["slots"].value.shape == (2, 5)
    assert grown["table"].value.shape == (2, 5)


def test_positions_entries_of_different_lengths_are_refused():
    cache = {"a": Positions(jnp.zeros((2, 40)), axis=1), "b": Positions(jnp.zeros((2, 50)), axis=1)}
    state = {"i": jnp.array(0, jnp.int32), "cache": cache}
    with pytest.raises(ValueError, match=r"must share one length, got \[40, 50\]"):
        while_growing(lambda s: s["i"] < 3, lambda s: {**s, "i": s["i"] + 1}, state)


@pytest.mark.parametrize("stopping", STOPPING)
def test_shrinking_the_batch_changes_no_output(stopping):
    # Two of eight sentences run long: once six have finished, the search goes on with a
    # quarter of the batch (2 sentences, 8 rows) instead of all 32 rows.
    length, k = 80, 4
    rng = np.random.default_rng(5)
    tables = np.log(rng.dirichlet(np.full(7, 0.5), size=(8, 7)))
    tables[:2, :, EOS] -= 6.0
    tables[2:, :, EOS] += 2.0
    limits = jnp.array([80, 70, 40, 33, 80, 20, 60, 80])
    kw = dict(batch_size=8, beam_size=k, bos_id=BOS, eos_id=EOS, max_len=length, n_best=2)

    def run(tables, rows, limits, shrink, calls=None, batch_size=8):
        inner, cache = history_chain(tables, rows, length, positions=True)

        def fn(ids, cache):
            if calls is not None:
                jax.debug.callback(lambda x: calls.append(x.shape[0]), ids)
            return inner(ids, cache)

        kwargs = {**kw, "batch_size": batch_size}
        return beam_search(
            fn, cache, **kwargs, max_lengths=limits, stopping=stopping, shrink=shrink
        )

    calls = {True: [], False: []}
    out = {}
    for shrink in (True, False):
        out[shrink] = jax.jit(functools.partial(run, shrink=shrink, calls=calls[shrink]))(
            tables, np.arange(8), limits
        )
        jax.effects_barrier()
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1], out[False][1])
    assert set(calls[False]) == {32} and set(calls[True]) == {32, 8}, set(calls[True])
    assert sum(calls[True]) < sum(calls[False]) * 0.6
    lengths = (np.asarray(out[True][0][:, 0]) != PAD).sum(-1)
    assert lengths[:2].min() > 40 and lengths[2:].max() < 20, lengths

    # A finished sentence's results no longer change, so each sentence alone gets the
    # output it gets in the batch.
    alone = jax.jit(functools.partial(run, shrink=True, batch_size=1))
    for s in range(8):
        seqs, scores = alone(tables, np.array([s]), limits[s : s + 1])
        np.testing.assert_array_equal(seqs[0], out[True][0][s])
        np.testing.assert_allclose(scores[0], out[True][1][s], rtol=1e-6)


@pytest.mark.parametrize("shrink", [False, True])
def test_a_finished_sentence_keeps_its_result_while_others_go_on(shrink):
    # Under "count", LONG_WINNER is done after 2 steps; its batch-mate runs to its limit of 20,
    # past the step (8) where the long winner would have displaced a finished output.
    endless = {t: {3: 0.5, 4: 0.5} for t in range(2, 10)}  # EOS only where forced
    tables = np.concatenate([first_order(LONG_WINNER, 10), first_order(endless, 10)])
    seqs, _ = run_beam(
        tables, [0, 1], batch_size=2, beam_size=2, alpha=1.0, max_len=20, n_best=2,
        stopping="count", shrink=shrink,
    )  # fmt: skip
    assert [ids_of(s) for s in seqs[0]] == [(EOS,), (3, EOS)]
    assert len(ids_of(seqs[1, 0])) == 20
