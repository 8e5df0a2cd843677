"""Training batches: tokenize this process's shard once, then pack epochs of it.

    pairs -> [shard] -> SentencePiece ids + EOS, over-long filtered or truncated
          -> TokenizedPairs (flat arrays) -> PackedBatches (grain IterDataset, `data.packing`)

Tokenizing up front (SentencePiece's C++ encoder, some 20-30k sentences/s per core) makes every
later epoch cost only indexing, and keeps the result independent of timing. The iterator has
`get_state()` / `set_state()`: a restored iterator yields exactly the batches the uninterrupted
one would have.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data.errors import DataError
from data.packing import FEATURES, PackedBatches, best_fit
from data.tokenizer import EOS_ID, Tokenizer

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 16384


class TokenizedPairs:
    """Tokenized examples in flat arrays; a grain random-access source.

    `[i]` is `{'inputs': [S] int32, 'targets': [T] int32}`, each ending in EOS.

    Args:
        ids: Per feature, all examples' ids concatenated ([sum of lengths], uint16 or int32).
        offsets: Per feature, [N + 1] int64: example i is `ids[offsets[i]:offsets[i + 1]]`.
    """

    def __init__(self, ids: dict[str, np.ndarray], offsets: dict[str, np.ndarray]):
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return len(self.offsets["inputs"]) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for k in FEATURES:
            o = self.offsets[k]
            out[k] = self.ids[k][o[i] : o[i + 1]].astype(np.int32)
        return out

    def lengths(self, feature: str) -> np.ndarray:
        """[N] int64 lengths (EOS included) of one feature."""
        return np.diff(self.offsets[feature])


def encode_pairs(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    *,
    row_length: int,
    overlong: str = "filter",
    indices: Sequence[int] | None = None,
) -> tuple[TokenizedPairs, dict[str, int]]:
    """Tokenizes pairs (adding EOS) and filters or truncates those longer than `row_length`.

    Args:
        pairs: `(source, target)` strings.
        tokenizer: The shared tokenizer.
        row_length: Longest allowed sequence, EOS included.
        overlong: 'filter' drops pairs with a side over `row_length`; 'truncate' cuts that side to
            `row_length - 1` ids plus EOS.
        indices: Which pairs to encode (default: all), e.g. this process's shard.

    Returns:
        The examples and counts: `pairs`, `examples`, `filtered`, `truncated`, `inputs_tokens`,
        `targets_tokens` (all EOS included).
    """
    if overlong not in ("filter", "truncate"):
        raise DataError(f"overlong={overlong!r}; expected 'filter' or 'truncate'")
    if row_length < 2:
        raise DataError(f"row_length={row_length}; expected at least 2 (one token and EOS)")
    indices = range(len(pairs)) if indices is None else indices
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    # Chunks go to numpy at once: Python lists of ints would take ~40 bytes per token.
    flat_chunks: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    len_chunks: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    for begin in range(0, len(indices), _ENCODE_CHUNK):
        batch = [pairs[int(i)] for i in indices[begin : begin + _ENCODE_CHUNK]]
        for k, texts in zip(FEATURES, zip(*batch, strict=True), strict=True):
            side = "source" if k == "inputs" else "target"
            encoded = tokenizer.encode_batch(texts, side=side)
            n = np.fromiter(map(len, encoded), np.int64, len(encoded))
            len_chunks[k].append(n)
            flat_chunks[k].append(
                np.fromiter(itertools.chain.from_iterable(encoded), dtype, int(n.sum()))
            )
    lengths = {k: np.concatenate([np.zeros(0, np.int64), *len_chunks[k]]) for k in FEATURES}
    too_long = np.zeros(len(indices), dtype=bool)
    for k in FEATURES:
        too_long |= lengths[k] + 1 > row_length
    stats = {"pairs": len(indices), "filtered": 0, "truncated": 0}
    keep = np.arange(len(indices))
    if overlong == "filter":
        keep = np.flatnonzero(~too_long)
        stats["filtered"] = int(too_long.sum())
    else:
        stats["truncated"] = int(too_long.sum())
    ids, offsets = {}, {}
    for k in FEATURES:
        flat = np.concatenate([np.zeros(0, dtype), *flat_chunks[k]])
        flat_chunks[k] = []
        raw_start = np.cumsum(lengths[k]) - lengths[k]
        # Copy the kept ids, cut to row_length - 1, into place and put EOS after each example.
        n = np.minimum(lengths[k][keep], row_length - 1)
        offsets[k] = np.concatenate([[0], np.cumsum(n + 1)]).astype(np.int64)
        pos = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        ids[k] = np.empty(int(offsets[k][-1]), dtype)
        ids[k][np.repeat(offsets[k][:-1], n) + pos] = flat[np.repeat(raw_start[keep], n) + pos]
        ids[k][offsets[k][1:] - 1] = EOS_ID
        stats[f"{k}_tokens"] = int(offsets[k][-1])
    stats["examples"] = len(keep)
    if too_long.any():
        log.warning(
            "%s %d of %d pairs longer than row_length=%d tokens (EOS included)",
            "dropped" if overlong == "filter" else "truncated",
            int(too_long.sum()),
            len(indices),
            row_length,
        )
    return TokenizedPairs(ids, offsets), stats


def rows_per_step(
    tokens_per_step: int,
    row_length: int,
    num_shards: int = 1,
    *,
    fill: float = 1.0,
    micro_batches: int = 1,
) -> int:
    """Rows per micro-batch whose real (non-padding) tokens per side add up to the budget.

    The paper's batches hold about 25,000 source and 25,000 target tokens. A packed row has
    `row_length` slots per side of which a fraction `fill` holds tokens (`packing_fill`), so a step
    needs `tokens_per_step / (fill * row_length)` rows, split over `micro_batches` micro-batches
    of equal shape. Rows per micro-batch are rounded to the nearest positive multiple of
    `num_shards` (every data-parallel device gets the same number), so the real count,
    `micro_batches * rows * fill * row_length`, is within half a multiple of the budget;
    `train.py` logs it.

    Args:
        tokens_per_step: Token budget per side per optimizer step, over all devices and hosts.
        row_length: Row length.
        num_shards: Data-parallel shards (devices); the result is a positive multiple of it.
        fill: Fraction of a packed row's slots that hold tokens (1.0: count slots).
        micro_batches: Gradient-accumulation micro-batches per step.
    """
    if min(tokens_per_step, row_length, num_shards, micro_batches) <= 0 or not 0 < fill <= 1:
        raise DataError(
            f"rows_per_step({tokens_per_step=}, {row_length=}, {num_shards=}, {fill=}, "
            f"{micro_batches=}): expected positive numbers and 0 < fill <= 1"
        )
    rows = tokens_per_step / (fill * row_length * micro_batches)
    return max(1, round(rows / num_shards)) * num_shards


def packing_fill(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    *,
    row_length: int,
    overlong: str = "filter",
    seed: int = 0,
    open_rows: int = 128,
    sample: int = 20_000,
) -> float:
    """Fraction of packed row slots (both sides) that hold tokens, for `rows_per_step`.

    Packs a seeded sample of up to `sample` pairs (all of them when fewer) the way
    `train_dataset` does; best-fit's fill depends on the length distribution, not on the
    corpus size, so a sample gives the figure to within a fraction of a percent in about a
    second. The same on every host and every restart (a function of its arguments).
    """
    n = len(pairs)
    chosen = (
        range(n) if n <= sample else np.sort(np.random.default_rng(seed).permutation(n)[:sample])
    )
    examples, _ = encode_pairs(
        pairs, tokenizer, row_length=row_length, overlong=overlong, indices=chosen
    )
    if len(examples) == 0:
        raise DataError(f"no pair of the {n} fits in {row_length=}")
    lengths = {k: examples.lengths(k) for k in FEATURES}
    order = np.random.default_rng([seed, 0]).permutation(len(examples))
    row, _, _ = best_fit({k: v[order] for k, v in lengths.items()}, row_length, open_rows)
    tokens = sum(int(v.sum()) for v in lengths.values())
    return tokens / (2 * (int(row.max()) + 1) * row_length)


def train_dataset(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    *,
    row_length: int,
    rows: int,
    seed: int = 0,
    num_epochs: int | None = None,
    overlong: str = "filter",
    process_index: int = 0,
    process_count: int = 1,
    open_rows: int = 128,
    prefetch: int = 0,
) -> grain.IterDataset:
    """Packed training batches of this process's shard of `pairs`.

    Each process reads pairs `process_index, process_index + process_count, ...`, so the hosts'
    slices are disjoint and together cover the corpus.

    Args:
        pairs: Training `(source, target)` strings (all of them; sharding happens here).
        tokenizer: The shared tokenizer.
        row_length: Row length; also the longest example (EOS included).
        rows: Rows per batch on this process (global rows / process_count).
        seed: Shuffling seed; the order differs per epoch and is the same for the same seed.
        num_epochs: Passes over the data; None repeats forever. With several processes use
            None and stop by step count: shards can differ in batches per epoch.
        overlong: 'filter' or 'truncate' examples over `row_length` (see `encode_pairs`).
        process_index: This host's index (`jax.process_index()`).
        process_count: Number of hosts (`jax.process_count()`).
        open_rows: Rows filled at once by best-fit packing; more pack tighter but plan each
            epoch more slowly.
        prefetch: If > 0, batches made ahead in a background thread (state stays exact);
            0 returns the `PackedBatches` itself (its `plan(epoch)` shows the epoch's packing).

    Returns:
        A grain IterDataset; `iter()` of it yields dicts of [rows, row_length] int32 arrays
        `inputs, inputs_segmentation, inputs_position, targets, targets_segmentation,
        targets_position` (segmentation 1, 2, ... per example in a row, 0 = padding; positions
        restart at 0 for each example) and has `get_state()` / `set_state()`.

    Raises:
        DataError: Bad process arguments, or no example fits in `row_length`.
    """
    if not 0 <= process_index < process_count:
        raise DataError(f"{process_index=} out of range for {process_count=}")
    shard = range(process_index, len(pairs), process_count)
    examples, stats = encode_pairs(
        pairs, tokenizer, row_length=row_length, overlong=overlong, indices=shard
    )
    if len(examples) == 0:
        raise DataError(
            f"no training examples on process {process_index}/{process_count}: "
            f"{stats['pairs']} pairs, {stats['filtered']} longer than {row_length=}"
        )
    log.info("process %d/%d training examples: %s", process_index, process_count, stats)
    ds = PackedBatches(
        examples,
        row_length=row_length,
        rows=rows,
        seed=seed,
        num_epochs=num_epochs,
        open_rows=open_rows,
    )
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def batch_stats(batch: dict[str, Any]) -> dict[str, float]:
    """Counts and packing efficiency (non-padding fraction) of one training batch.

    Args:
        batch: A batch from `train_dataset` ([rows, row_length] arrays).

    Returns:
        `examples`, `inputs_tokens`, `targets_tokens`, and `inputs_efficiency`,
        `targets_efficiency`, `efficiency` (both sides) in [0, 1].
    """
    out = {}
    for k in FEATURES:
        seg = np.asarray(batch[f"{k}_segmentation"])
        out[f"{k}_tokens"] = int(np.count_nonzero(seg))
        out[f"{k}_efficiency"] = out[f"{k}_tokens"] / seg.size
    out["efficiency"] = (out["inputs_tokens"] + out["targets_tokens"]) / (2 * seg.size)
    # Segment ids count up from 1 in each row, so the row maximum is its example count.
    out["examples"] = int(np.asarray(batch["inputs_segmentation"]).max(axis=1).sum())
    return out
