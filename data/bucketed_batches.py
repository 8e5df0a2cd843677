"""Padded, length-bucketed batches for evaluation and decoding, with a way back to input order.

Decoding sorts sentences by length so each batch wastes little padding, and pads widths to a few
bucket sizes so a jitted decoder compiles only a few shapes. Every batch carries the original
index of each row (-1 for filler rows), and `restore_order` puts the outputs back in input
order. For decoding nothing is dropped: empty lines become a lone EOS and over-long ones are
truncated (and counted in the log); a dev loss can leave over-long pairs out instead, as
training does (`overlong='filter'`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np

from data.errors import DataError
from data.tokenizer import EOS_ID, PAD_ID, Tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")


def default_buckets(max_tokens: int, smallest: int = 8) -> list[int]:
    """Widths 8, 16, 24, 32, 48, 64, 96, ... below `max_tokens`, then `max_tokens` itself.

    Powers of two and their midpoints bound the padding per row to a third while keeping the
    number of shapes (and so of decoder compilations) logarithmic in `max_tokens`.
    """
    widths, width = [], smallest
    while width < max_tokens:
        widths.append(width)
        if width >= 2 * smallest and width * 3 // 2 < max_tokens:
            widths.append(width * 3 // 2)
        width *= 2
    return [*widths, max_tokens]


def _checked_buckets(
    caller: str, buckets, max_tokens: int, tokens_per_batch: int, row_multiple: int
) -> list[int]:
    """The sorted bucket widths (``default_buckets`` if none), the batch layout checked."""
    if max_tokens < 2 or tokens_per_batch < 1 or row_multiple < 1:
        raise DataError(f"{caller}: bad {max_tokens=}, {tokens_per_batch=} or {row_multiple=}")
    buckets = sorted(buckets or default_buckets(max_tokens))
    if buckets[-1] < max_tokens:
        raise DataError(
            f"largest bucket {buckets[-1]} < {max_tokens=}; expected it to cover max_tokens"
        )
    return buckets


def _encode(
    texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int, cut: bool, side: str = "source"
):
    """Ids + EOS per text, and which are longer than `max_tokens`; cut to it if `cut`."""
    out, over = [], np.zeros(len(texts), dtype=bool)
    for i, ids in enumerate(tokenizer.encode_batch(texts, side=side)):
        if len(ids) + 1 > max_tokens:
            over[i] = True
            ids = ids[: max_tokens - 1] if cut else ids
        out.append([*ids, EOS_ID])
    return out, over


def _pad(seqs: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int32)
    for r, s in enumerate(seqs):
        out[r, : len(s)] = s
    return out


def padded_batches(
    sources: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_tokens: int,
    tokens_per_batch: int,
    targets: Sequence[str] | None = None,
    buckets: Sequence[int] | None = None,
    row_multiple: int = 1,
    fixed_rows: bool = False,
    overlong: str = "truncate",
) -> list[dict[str, np.ndarray]]:
    """Groups sentences of similar length into padded batches under a token budget.

    Args:
        sources: Source sentences, in their original order (empty strings allowed).
        tokenizer: The shared tokenizer.
        max_tokens: Longest sequence (EOS included); longer ones are truncated or left out, as
            `overlong` says.
        tokens_per_batch: Budget of rows * width per batch (at least one row per batch).
        targets: Optional references, aligned with `sources` (e.g. for an evaluation loss).
        buckets: Allowed widths, ascending, the last >= every length; default
            `default_buckets(max_tokens)`.
        row_multiple: Rows per batch are a multiple of this (e.g. the data-parallel devices).
        fixed_rows: Pad the last batch of each bucket with filler rows so all batches of a
            bucket have one shape (fewer compilations, but wasteful on small sets: without
            it a bucket has at most two shapes, which jit caches across evaluations anyway).
        overlong: 'truncate' (decoding: every input gets an output) or 'filter': leave out
            every sentence, or pair, with a side over `max_tokens`, as training does with
            `overlong='filter'` (a dev loss then measures what the model was trained on).

    Returns:
        Batches in order of increasing width, each a dict with `inputs` [B, S] int32 (ids +
        EOS, 0-padded), `index` [B] int32 (position in `sources`, -1 for filler rows) and, if
        `targets` were given, `targets` [B, S] int32 (same width S as `inputs`).

    Raises:
        DataError: `targets` not aligned with `sources`, or bad sizes.
    """
    if targets is not None and len(targets) != len(sources):
        raise DataError(f"{len(sources)} sources but {len(targets)} targets; expected equal")
    buckets = _checked_buckets(
        "padded_batches", buckets, max_tokens, tokens_per_batch, row_multiple
    )
    if overlong not in ("truncate", "filter"):
        raise DataError(f"padded_batches: overlong={overlong!r}; expected 'truncate' or 'filter'")
    sides = {"inputs": sources} if targets is None else {"inputs": sources, "targets": targets}
    features, over = {}, np.zeros(len(sources), dtype=bool)
    for k, texts in sides.items():
        side = "source" if k == "inputs" else "target"
        features[k], too_long = _encode(
            texts, tokenizer, max_tokens, cut=overlong == "truncate", side=side
        )
        if too_long.any():
            log.warning(
                "%s %d of %d %s longer than max_tokens=%d tokens (EOS included)",
                "truncated" if overlong == "truncate" else "left out",
                int(too_long.sum()),
                len(texts),
                "sources" if k == "inputs" else "targets",
                max_tokens,
            )
        over |= too_long
    kept = np.flatnonzero(~over) if overlong == "filter" else np.arange(len(sources))
    lengths = np.zeros(len(sources), dtype=np.int64)
    for seqs in features.values():
        lengths = np.maximum(lengths, [len(s) for s in seqs])
    widths = np.asarray(buckets)[np.searchsorted(buckets, np.minimum(lengths, max_tokens))]
    order = kept[np.lexsort((lengths[kept], widths[kept]))]  # By bucket, then length; stable.
    batches = []
    for width in np.unique(widths):
        members = order[widths[order] == width]
        rows = max(1, tokens_per_batch // int(width)) // row_multiple * row_multiple
        rows = max(rows, row_multiple)
        for begin in range(0, len(members), rows):
            index = members[begin : begin + rows]
            n_rows = rows if fixed_rows else -(-len(index) // row_multiple) * row_multiple
            filler = n_rows - len(index)
            batch = {"index": np.concatenate([index, np.full(filler, -1)]).astype(np.int32)}
            for k, seqs in features.items():
                batch[k] = _pad([seqs[i] for i in index] + [[]] * filler, int(width))
            batches.append(batch)
    return batches


def decoding_batches(
    sources: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_tokens: int,
    tokens_per_batch: int,
    row_multiple: int = 1,
    buckets: Sequence[int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Length-sorted batches in few shapes, so that a jitted search compiles few programs.

    Each bucket width W holds ``rows(W)`` sentences per batch: the largest power of two (times
    ``row_multiple``) within ``tokens_per_batch // W``. A bucket's sentences that do not fill a
    last batch move on to the next wider bucket rather than make a smaller shape of their own;
    only the very last batch is partial, its rows rounded up to a power of two (times
    ``row_multiple``) with filler rows. So a whole file decodes with one shape per width plus
    one, and the same shapes recur across files (a persistent compilation cache keeps them).
    Sentences are sorted by length, so those of a batch tend to finish together.

    Args:
        sources: Source sentences in input order (empty strings allowed).
        tokenizer: The shared tokenizer.
        max_tokens: Longest sequence (EOS included); longer ones are truncated (and counted).
        tokens_per_batch: Budget of rows x width per batch.
        row_multiple: Rows per batch are a multiple of this (the data-parallel devices).
        buckets: Allowed widths, ascending; default ``default_buckets(max_tokens)``.

    Returns:
        Batches of increasing width: ``inputs`` [R, W] int32 (ids + EOS, 0-padded; filler rows
        are all 0) and ``index`` [R] int32 (position in ``sources``, -1 for filler rows).
    """
    buckets = _checked_buckets(
        "decoding_batches", buckets, max_tokens, tokens_per_batch, row_multiple
    )
    seqs, over = _encode(sources, tokenizer, max_tokens, cut=True)
    if over.any():
        log.warning(
            "truncated %d of %d sources longer than max_tokens=%d tokens (EOS included)",
            int(over.sum()), len(sources), max_tokens,
        )  # fmt: skip
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    widths = np.asarray(buckets)[np.searchsorted(buckets, lengths)]
    order = np.argsort(lengths, kind="stable")

    def rows_for(width: int) -> int:
        budget = max(1, tokens_per_batch // (width * row_multiple))
        return (1 << (budget.bit_length() - 1)) * row_multiple

    def make(index: np.ndarray, rows: int, width: int) -> dict[str, np.ndarray]:
        filler = rows - len(index)
        return {
            "inputs": _pad([seqs[i] for i in index] + [[]] * filler, width),
            "index": np.concatenate([index, np.full(filler, -1)]).astype(np.int32),
        }

    batches, carried = [], np.zeros(0, np.int64)
    for width in np.unique(widths):
        members = np.concatenate([carried, order[widths[order] == width]])
        rows = rows_for(int(width))
        full = len(members) // rows * rows
        batches += [make(members[b : b + rows], rows, int(width)) for b in range(0, full, rows)]
        carried, last_width = members[full:], int(width)
    if len(carried):
        rows = 1 << (int(-(-len(carried) // row_multiple)) - 1).bit_length()
        batches.append(make(carried, rows * row_multiple, last_width))
    return batches


def restore_order(indices: Iterable[np.ndarray], outputs: Iterable[Sequence[T]], n: int) -> list[T]:
    """Puts per-batch outputs back in the order of the original inputs.

    Args:
        indices: Each batch's `index` array ([B], -1 for filler rows).
        outputs: Each batch's outputs, one per row (filler rows' outputs are ignored).
        n: Number of original inputs.

    Returns:
        `n` outputs, the i-th for input i.

    Raises:
        DataError: An input got no output or more than one.
    """
    result: list = [None] * n
    seen = np.zeros(n, dtype=bool)
    for index, out in zip(indices, outputs, strict=True):
        index = np.asarray(index)
        if len(out) != len(index):
            raise DataError(f"a batch has {len(index)} rows but {len(out)} outputs")
        for i, o in zip(index.tolist(), out, strict=True):
            if i < 0:
                continue
            if seen[i]:
                raise DataError(f"input {i} has more than one output")
            seen[i] = True
            result[i] = o
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise DataError(f"{len(missing)} of {n} inputs have no output, e.g. {missing[:5].tolist()}")
    return result
