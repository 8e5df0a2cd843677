"""Tests for data.pipeline / data.packing (training batches) and data.bucketed_batches."""

import logging
import random
from collections import Counter

import numpy as np
import pytest

from data.bucketed_batches import default_buckets, padded_batches, restore_order
from data.errors import DataError
from data.pipeline import batch_stats, encode_pairs, packing_fill, rows_per_step, train_dataset
from data.sources import ParallelText
from data.tokenizer import train_tokenizer

KEYS = {f"{k}{s}" for k in ("inputs", "targets") for s in ("", "_segmentation", "_position")}
SYLLABLES = "ka lo mi ne su ta ri po de fa gu ve la so ni".split()


def synthetic_pairs(n: int, seed: int = 0, max_words: int = 12) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def sentence(syllables):
        n_words = rng.randint(1, max_words)
        words = ("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(n_words))
        return " ".join(words) + "."

    return [(sentence(SYLLABLES[:10]), sentence(SYLLABLES[5:])) for _ in range(n)]


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(600)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, pairs):
    return train_tokenizer(pairs, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=200)


def take(it, n):
    return [next(it) for _ in range(n)]


def segments(batch):
    """Yields (inputs, targets) id tuples of every packed example in a batch."""
    for r in range(batch["inputs"].shape[0]):
        for s in range(1, batch["inputs_segmentation"][r].max() + 1):
            yield tuple(
                tuple(batch[k][r][batch[f"{k}_segmentation"][r] == s])
                for k in ("inputs", "targets")
            )


def example_set(pairs, tok, row_length):
    examples, _ = encode_pairs(pairs, tok, row_length=row_length)
    return Counter(
        (tuple(examples[i]["inputs"]), tuple(examples[i]["targets"])) for i in range(len(examples))
    )


def test_encode_pairs_filter_and_truncate(tok, caplog):
    data = [("ka lo mi ne su ta ri po " * 4, "de."), ("ka.", "de fa."), ("", "")]
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        examples, stats = encode_pairs(data, tok, row_length=8)
    assert "dropped 1 of 3 pairs longer than row_length=8" in caplog.text
    assert stats["filtered"] == 1 and stats["examples"] == len(examples) == 2
    assert list(examples[0]["inputs"]) == [*tok.encode("ka."), 1]
    assert list(examples[1]["inputs"]) == [1]  # An empty side is just EOS.
    assert examples[0]["inputs"].dtype == np.int32
    examples, stats = encode_pairs(data, tok, row_length=8, overlong="truncate")
    assert stats["truncated"] == 1 and len(examples) == 3
    assert list(examples[0]["inputs"]) == [*tok.encode(data[0][0])[:7], 1]
    assert stats["inputs_tokens"] == sum(len(examples[i]["inputs"]) for i in range(3))
    with pytest.raises(DataError, match="overlong"):
        encode_pairs(data, tok, row_length=8, overlong="drop")


def test_rows_per_step_counts_tokens_not_slots():
    # 25,000 slots of 128 are 195.3 rows; the nearest count is taken, not the next one up.
    assert rows_per_step(25_000, 128) == 195
    assert rows_per_step(25_000, 128, num_shards=8) == 192
    assert rows_per_step(10, 128, num_shards=4) == 4  # at least one row per shard
    # Rows 95% full need 1/0.95 as many rows for the same tokens.
    assert rows_per_step(25_000, 128, fill=0.95) == 206
    # The WMT layout: 25,000 tokens of rows 256 long, 95% full, on 8 devices, with and without
    # accumulation. Rounding each micro-batch up used to add rows (13 x 8 = 104 for 97.7
    # rows' worth of slots); now the total is the nearest to the real budget (102.8 rows).
    wmt = dict(tokens_per_step=25_000, row_length=256, fill=0.95)
    assert rows_per_step(**wmt, num_shards=8) == 104
    assert rows_per_step(**wmt, num_shards=1, micro_batches=8) == 13
    assert rows_per_step(**wmt, num_shards=2, micro_batches=4) == 26
    for shards, accum in ((1, 1), (8, 1), (1, 8), (2, 4), (4, 2)):
        rows = rows_per_step(**wmt, num_shards=shards, micro_batches=accum)
        real = accum * rows * 256 * 0.95
        assert abs(real - 25_000) <= shards * accum * 256 * 0.95 / 2, (shards, accum)
    for bad in (dict(tokens_per_step=0), dict(fill=0.0), dict(fill=1.5), dict(micro_batches=0)):
        with pytest.raises(DataError):
            rows_per_step(**{"tokens_per_step": 1000, "row_length": 128, **bad})


def test_the_token_budget_is_the_real_number_of_tokens(pairs, tok):
    row_length, budget = 32, 1200
    fill = packing_fill(pairs, tok, row_length=row_length, seed=5)
    assert 0.6 < fill < 1.0
    assert packing_fill(pairs, tok, row_length=row_length, seed=5) == fill  # the same on every host
    rows = rows_per_step(budget, row_length, fill=fill)
    ds = train_dataset(pairs, tok, row_length=row_length, rows=rows, seed=5)
    sides = []
    for batch in take(iter(ds), ds.plan(0).num_batches):  # one whole epoch
        stats = batch_stats(batch)
        sides.append((stats["inputs_tokens"] + stats["targets_tokens"]) / 2)
    # The average real tokens per side per step, within a row's worth of the budget (the
    # slot count, rows * row_length, is 1/fill times larger).
    assert abs(np.mean(sides) - budget) <= fill * row_length
    assert abs(packing_fill(pairs, tok, row_length=row_length, seed=5, sample=300) - fill) < 0.03


def test_batches_are_well_formed_packed_examples(pairs, tok):
    row_length, rows = 32, 8
    known = example_set(pairs, tok, row_length)
    it = iter(train_dataset(pairs, tok, row_length=row_length, rows=rows, seed=3))
    for batch in take(it, 5):
        assert set(batch) == KEYS
        for v in batch.values():
            assert v.shape == (rows, row_length) and v.dtype == np.int32
        for k in ("inputs", "targets"):
            seg, pos, ids = (batch[f"{k}{s}"] for s in ("_segmentation", "_position", ""))
            for r in range(rows):
                n = np.count_nonzero(seg[r])
                # Segments 1, 2, ... are contiguous and padding only at the end.
                assert np.all(np.diff(seg[r][:n]) >= 0) and np.all(seg[r][n:] == 0)
                assert set(seg[r][:n]) == set(range(1, seg[r].max() + 1))
                assert np.all(ids[r][n:] == 0) and np.all(pos[r][n:] == 0)
                for s in range(1, seg[r].max() + 1):
                    m = seg[r] == s
                    assert list(pos[r][m]) == list(range(m.sum()))
                    assert ids[r][m][-1] == 1  # EOS ends every example; no BOS, no shift.
        assert np.array_equal(
            batch["inputs_segmentation"].max(axis=1), batch["targets_segmentation"].max(axis=1)
        )
        for ex in segments(batch):
            assert ex in known


def test_an_epoch_uses_each_example_at_most_once(pairs, tok):
    ds = train_dataset(pairs, tok, row_length=32, rows=4, seed=0, num_epochs=1)
    seen = Counter(ex for batch in ds for ex in segments(batch))
    known = example_set(pairs, tok, 32)
    assert not seen - known  # Nothing invented, nothing repeated beyond the corpus.
    assert seen.total() + ds.plan(0).dropped == known.total()
    assert ds.plan(0).dropped < 4 * 32  # Only the rows of one partial batch are left over.


def test_same_seed_same_batches_and_epochs_differ(pairs, tok):
    def first_batches(seed, n=6):
        return take(iter(train_dataset(pairs, tok, row_length=32, rows=8, seed=seed)), n)

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in KEYS)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    ds = train_dataset(pairs, tok, row_length=32, rows=8, seed=0)
    p0, p1 = ds.plan(0), ds.plan(1)
    assert not np.array_equal(p0.example[: len(p1.example)], p1.example[: len(p0.example)])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resumed_iterator_yields_the_same_batches(pairs, tok, prefetch):
    def make():
        ds = train_dataset(pairs, tok, row_length=32, rows=8, seed=5, prefetch=prefetch)
        return iter(ds)

    reference = make()
    per_epoch = train_dataset(pairs, tok, row_length=32, rows=8, seed=5).plan(0).num_batches
    states, batches = [], []
    for _ in range(2 * per_epoch + 3):  # Crosses two epoch boundaries.
        states.append(reference.get_state())
        batches.append(next(reference))
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2):
        resumed = make()
        resumed.set_state(states[k])
        for want in batches[k : k + 4]:
            got = next(resumed)
            assert all(np.array_equal(got[key], want[key]) for key in KEYS)


def test_process_shards_are_disjoint_and_cover_everything(pairs, tok):
    count = 3
    shards = [
        Counter(
            ex
            for batch in train_dataset(
                pairs,
                tok,
                row_length=32,
                rows=1,
                num_epochs=1,
                process_index=i,
                process_count=count,
            )
            for ex in segments(batch)
        )
        for i in range(count)
    ]
    assert sum(shards, Counter()) == example_set(pairs, tok, 32)
    # The shards are slices of the pair indices, so their sizes differ by at most one pair.
    sizes = [s.total() for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_train_dataset_errors(pairs, tok):
    with pytest.raises(DataError, match="process_index"):
        train_dataset(pairs, tok, row_length=32, rows=4, process_index=2, process_count=2)
    with pytest.raises(DataError, match="no training examples"):
        train_dataset(pairs, tok, row_length=2, rows=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        next(iter(train_dataset(pairs[:5], tok, row_length=32, rows=100)))


def test_batch_stats():
    seg = np.array([[1, 1, 2, 0], [1, 0, 0, 0]], dtype=np.int32)
    batch = {"inputs_segmentation": seg, "targets_segmentation": np.ones_like(seg)}
    stats = batch_stats(batch)
    assert stats["inputs_tokens"] == 4 and stats["targets_tokens"] == 8
    assert stats["inputs_efficiency"] == 0.5 and stats["efficiency"] == 0.75
    assert stats["examples"] == 3


def test_packing_efficiency_on_the_tiny_corpus(tiny_corpus, tmp_path):
    bible = ParallelText(tiny_corpus / "train.en", tiny_corpus / "train.es")
    tok = train_tokenizer(bible, tmp_path / "t.model", vocab_size=1000)
    # Verses of at most 25 words: rows of 64 leave more room unfilled than rows of 128.
    for row_length, floor in ((64, 0.85), (128, 0.9)):
        ds = train_dataset(
            bible, tok, row_length=row_length, rows=rows_per_step(25_000, row_length)
        )
        assert ds.plan(0).efficiency >= floor
        for batch in take(iter(ds), 3):
            assert batch_stats(batch)["efficiency"] >= floor


def test_padded_batches_lose_and_reorder_nothing(tok, caplog):
    sources = [text for pair in synthetic_pairs(150, seed=9, max_words=30) for text in pair]
    sources[3] = sources[40] = ""
    sources[7] = "ka lo mi " * 40  # Far over row_length.
    targets = sources[::-1]
    row_length, budget = 48, 200
    with caplog.at_level(logging.WARNING, logger="data.bucketed_batches"):
        batches = padded_batches(
            sources,
            tok,
            max_tokens=row_length,
            tokens_per_batch=budget,
            targets=targets,
            row_multiple=2,
            fixed_rows=True,
        )
    assert "truncated" in caplog.text
    truncated = sum(len(tok.encode(s)) + 1 > row_length for s in sources)
    assert truncated >= 1 and f"truncated {truncated} of {len(sources)} sources" in caplog.text
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[index >= 0]) == list(range(len(sources)))
    shapes, lengths = {}, {}
    for b in batches:
        # Sorted by length within a bucket, so batches waste little padding.
        row_lengths = np.count_nonzero(b["inputs"] | b["targets"], axis=1)[b["index"] >= 0]
        lengths.setdefault(b["inputs"].shape[1], []).extend(row_lengths)
        rows, width = b["inputs"].shape
        assert width in default_buckets(row_length) and b["targets"].shape == (rows, width)
        assert rows % 2 == 0 and (rows * width <= budget or rows == 2)
        assert shapes.setdefault(width, rows) == rows  # One shape per bucket.
        for r, i in enumerate(b["index"]):
            if i < 0:
                assert not b["inputs"][r].any() and not b["targets"][r].any()
                continue
            for k, texts in (("inputs", sources), ("targets", targets)):
                want = [*tok.encode(texts[i])[: row_length - 1], 1]
                assert list(b[k][r][: len(want)]) == want and not b[k][r][len(want) :].any()
    widths = sorted(lengths)
    for narrower, wider in zip(widths, widths[1:], strict=False):
        assert max(lengths[narrower]) <= narrower < min(lengths[wider])
    assert all(np.all(np.diff(v) >= 0) for v in lengths.values())
    # Decode every batch, then restore: each output lands at its source's position.
    outputs = [tok.decode_batch(b["inputs"]) for b in batches]
    restored = restore_order([b["index"] for b in batches], outputs, len(sources))
    for i, text in enumerate(restored):
        assert text == (tok.decode(tok.encode(sources[i])[: row_length - 1]))
    assert restored[3] == "" and restored[0] == sources[0]


def test_padded_batches_can_leave_out_over_long_pairs_as_training_does(tok, caplog):
    sources = ["ka lo.", "mi " * 40, "ne su.", "ta ri po.", "de fa."]
    targets = ["de.", "fa gu.", "ve la " * 40, "so ni.", "ka."]
    with caplog.at_level(logging.WARNING, logger="data.bucketed_batches"):
        batches = padded_batches(
            sources, tok, max_tokens=16, tokens_per_batch=64, targets=targets, overlong="filter"
        )
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[index >= 0]) == [0, 3, 4]  # pairs 1 and 2 have a side over 16 tokens
    assert "left out 1 of 5 sources" in caplog.text and "left out 1 of 5 targets" in caplog.text
    kept = encode_pairs(list(zip(sources, targets, strict=True)), tok, row_length=16)[0]
    assert len(kept) == 3  # exactly the pairs training keeps
    # Decoding keeps truncating: every input gets an output.
    batches = padded_batches(sources, tok, max_tokens=16, tokens_per_batch=64, targets=targets)
    assert sum(int((b["index"] >= 0).sum()) for b in batches) == 5
    with pytest.raises(DataError, match="overlong='drop'"):
        padded_batches(sources, tok, max_tokens=16, tokens_per_batch=64, overlong="drop")


def test_dev_loss_leaves_out_what_training_leaves_out(tok):
    import jax
    import ml_collections

    from model import Transformer, TransformerConfig, make_mesh
    from training.evaluation import Evaluator

    dev = [("ka lo.", "de."), ("mi " * 40, "fa."), ("ne su.", "so ni.")]
    config = ml_collections.ConfigDict(
        dict(row_length=16, eval_tokens_per_batch=64, eval_sentences=0, beam_size=1, alpha=0.6,
             num_samples=0, overlong="filter")
    )  # fmt: skip
    model = Transformer(TransformerConfig.tiny(tok.vocab_size, max_positions=16))
    mesh = make_mesh(devices=jax.devices()[:1])
    for overlong, expected in (("filter", [0, 2]), ("truncate", [0, 1, 2])):
        config.overlong = overlong
        evaluator = Evaluator(model, tok, dev, config, mesh=mesh, eval_step=None)
        index = np.concatenate([b["index"] for b in evaluator._loss_batches])
        assert sorted(index[index >= 0]) == expected, overlong


def test_padded_batches_without_targets_or_fixed_rows(tok):
    sources = ["ka lo.", "mi ne su ta ri po.", "de.", "ka lo mi ne su ta ri po de fa gu ve."]
    lengths = [len(tok.encode(s)) + 1 for s in sources]
    assert max(lengths[:3]) <= 8 < lengths[3] <= 16
    batches = padded_batches(sources, tok, max_tokens=16, tokens_per_batch=32)
    assert all(set(b) == {"inputs", "index"} for b in batches)
    # Shortest first; no filler rows, so the last batch of a bucket may have fewer rows.
    assert [b["inputs"].shape for b in batches] == [(3, 8), (1, 16)]
    assert [list(b["index"]) for b in batches] == [list(np.argsort(lengths[:3])), [3]]
    batches = padded_batches(["ka lo."], tok, max_tokens=16, tokens_per_batch=32, fixed_rows=True)
    assert list(batches[0]["index"]) == [0, -1, -1, -1]
    assert padded_batches([], tok, max_tokens=16, tokens_per_batch=64) == []
    with pytest.raises(DataError, match="4 sources but 2 targets"):
        padded_batches(sources, tok, max_tokens=16, tokens_per_batch=64, targets=["a", "b"])


def test_restore_order_detects_missing_and_duplicate_outputs():
    assert restore_order([np.array([2, -1, 0]), np.array([1])], [["c", "x", "a"], ["b"]], 3) == [
        "a",
        "b",
        "c",
    ]
    with pytest.raises(DataError, match="1 of 3 inputs have no output"):
        restore_order([np.array([2, 0])], [["c", "a"]], 3)
    with pytest.raises(DataError, match="more than one output"):
        restore_order([np.array([0, 0])], [["a", "a"]], 1)
    with pytest.raises(DataError, match="2 rows but 1 outputs"):
        restore_order([np.array([0, 1])], [["a"]], 2)


def test_state_from_other_data_is_rejected(pairs, tok):
    it = iter(train_dataset(pairs, tok, row_length=32, rows=8))
    it.set_state({"epoch": 0, "batch": 10_000})
    with pytest.raises(DataError, match="past the"):
        next(it)
