"""Sentence-pair sources: every source is a random-access sequence of `(source, target)` strings.

All sources follow grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`), so the
rest of the pipeline never needs to know where the pairs came from:

- `ParallelText`: two aligned files `PREFIX.SRC` and `PREFIX.TGT`, one sentence per line (the
  fairseq / Marian convention).
- `TSVPairs`: one file, `source<TAB>target` per line.
- `data.tfds_source.TFDSPairs`: a TFDS translation dataset (imported lazily by `open_split`).

Files are read once as bytes and indexed by line offsets (numpy), so a multi-million-line corpus
costs little more memory than its size on disk; lines are decoded on access.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError

log = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"
# Bytes that count as blank in a line. Lines made only of these and of non-ASCII bytes are
# re-checked with `str.strip`, which also knows the Unicode spaces.
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 32]] = True
_MAYBE_BLANK = _ASCII_SPACE.copy()
_MAYBE_BLANK[128:] = True

Pair = tuple[str, str]


class _Lines:
    """The lines of one UTF-8 text file, as byte offsets into its contents.

    Handles a leading UTF-8 BOM, CRLF line endings and a missing final newline. Only `\\n` ends
    a line (unlike `str.splitlines`, which would also split on U+2028 and friends and so
    misalign parallel files).

    Attributes:
        path: The file.
        data: The file's bytes (BOM removed).
        starts: [N] int64, offset of each line's first byte.
        ends: [N] int64, offset one past each line's last byte (excluding `\\r\\n` / `\\n`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise DataError(f"{self.path}: is a directory, expected a text file") from None
        if data.startswith(_BOM):
            data = data[len(_BOM) :]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(
                f"{self.path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start}); "
                "expected UTF-8 text"
            ) from None
        self.data = data
        buf = np.frombuffer(data, dtype=np.uint8)
        newlines = np.flatnonzero(buf == 10)
        ends = newlines
        if len(data) and data[-1:] != b"\n":
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], newlines + 1])[: len(ends)]
        # CRLF: drop the '\r' before each '\n'.
        has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)
        self.starts = starts.astype(np.int64)
        self.ends = (ends - has_cr).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:
        return self.data[self.starts[i] : self.ends[i]].decode("utf-8")

    def blank(self) -> np.ndarray:
        """Returns [N] bool: which lines are empty or whitespace-only."""
        return _blank(self.data, self.starts, self.ends)


def _blank(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which byte ranges `data[starts[i]:ends[i]]` hold only whitespace. Shapes: [N] -> [N]."""
    buf = np.frombuffer(data, dtype=np.uint8)
    # Count, per line, the bytes that certainly are not blank (prefix sums, no Python loop).
    solid = np.concatenate([[0], np.cumsum(~_MAYBE_BLANK[buf], dtype=np.int64)])
    candidates = np.flatnonzero(solid[ends] - solid[starts] == 0)
    blank = np.zeros(len(starts), dtype=bool)
    for i in candidates:  # Rare: empty lines and lines of only non-ASCII text.
        blank[i] = not data[starts[i] : ends[i]].decode("utf-8").strip()
    return blank


def _log_dropped(what: str, dropped: int, total: int) -> None:
    if dropped:
        log.warning("%s: dropped %d of %d pairs with an empty side", what, dropped, total)


class ParallelText:
    """Aligned text files `src_path` and `tgt_path`, one sentence per line.

    Pairs where either side is empty or whitespace-only are dropped (and the count logged), as
    they teach the model nothing and usually mark an alignment accident.

    Args:
        src_path: Source-language file.
        tgt_path: Target-language file with the same number of lines.
        drop_empty: Whether to drop pairs with an empty side.

    Raises:
        DataError: A file is missing or not UTF-8, or the line counts differ.
    """

    def __init__(self, src_path: str | Path, tgt_path: str | Path, *, drop_empty: bool = True):
        self._src, self._tgt = _Lines(src_path), _Lines(tgt_path)
        n_src, n_tgt = len(self._src), len(self._tgt)
        if n_src != n_tgt:
            raise DataError(
                f"parallel files differ in length: {self._src.path} has {n_src} lines, "
                f"{self._tgt.path} has {n_tgt} lines; expected one target line per source line"
            )
        keep = np.arange(n_src)
        if drop_empty:
            keep = np.flatnonzero(~(self._src.blank() | self._tgt.blank()))
            _log_dropped(f"{self._src.path} / {self._tgt.path}", n_src - len(keep), n_src)
        self._keep = keep

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> Pair:
        j = self._keep[i]
        return self._src[j], self._tgt[j]

    def __repr__(self) -> str:
        return f"ParallelText({str(self._src.path)!r}, {str(self._tgt.path)!r}, len={len(self)})"


class TSVPairs:
    """A file with one `source<TAB>target` pair per line.

    Blank lines and pairs with an empty side are dropped (and counted in the log).

    Args:
        path: The TSV file.
        drop_empty: Whether to drop pairs with an empty side.

    Raises:
        DataError: The file is missing or not UTF-8, or a non-blank line does not contain exactly
            one tab.
    """

    def __init__(self, path: str | Path, *, drop_empty: bool = True):
        lines = _Lines(path)
        self._lines = lines
        buf = np.frombuffer(lines.data, dtype=np.uint8)
        tabs = np.flatnonzero(buf == 9)
        # Tabs per line by binary search on the sorted tab offsets.
        first = np.searchsorted(tabs, lines.starts)
        n_tabs = np.searchsorted(tabs, lines.ends) - first
        blank_line = lines.blank()
        bad = np.flatnonzero((n_tabs != 1) & ~blank_line)
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{lines.path}:{i + 1}: found {int(n_tabs[i])} tabs, expected exactly one "
                f"(source<TAB>target): {lines[i][:80]!r}"
            )
        line_ids = np.flatnonzero(~blank_line)
        tab = tabs[first[line_ids]]
        self._src = (lines.starts[line_ids], tab)
        self._tgt = (tab + 1, lines.ends[line_ids])
        keep = np.arange(len(line_ids))
        if drop_empty:
            empty = _blank(lines.data, *self._src) | _blank(lines.data, *self._tgt)
            keep = np.flatnonzero(~empty)
        _log_dropped(str(lines.path), len(lines) - len(keep), len(lines))
        self._keep = keep

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> Pair:
        j = self._keep[i]
        data = self._lines.data
        return (
            data[self._src[0][j] : self._src[1][j]].decode("utf-8"),
            data[self._tgt[0][j] : self._tgt[1][j]].decode("utf-8"),
        )

    def __repr__(self) -> str:
        return f"TSVPairs({str(self._lines.path)!r}, len={len(self)})"


_TFDS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def _tsv_path(prefix: str) -> str:
    return prefix if prefix.endswith(".tsv") else f"{prefix}.tsv"


def open_split(data_cfg: Any, split: str) -> Sequence[Pair]:
    """Opens one split of the corpus the data config describes.

    See the `data` package docstring for the config fields.

    Args:
        data_cfg: An `ml_collections.ConfigDict` (anything with `.get(name, default)`).
        split: 'train', 'dev' or 'test'.

    Returns:
        A random-access sequence of `(source, target)` string pairs.

    Raises:
        DataError: Unknown source or split, missing files, malformed data, or an empty training
            split.
    """
    if split not in _TFDS_SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_TFDS_SPLITS)}")
    kind = data_cfg.get("source", "default")
    src, tgt = data_cfg.get("source_lang", "en"), data_cfg.get("target_lang", "es")
    if kind == "default":
        bible = importlib.import_module("data.bible")
        corpus = Path(bible.ensure_default_corpus(data_cfg.get("data_dir")))
        pairs = ParallelText(corpus / f"{split}.{src}", corpus / f"{split}.{tgt}")
    elif kind in ("text", "tsv"):
        prefix = data_cfg.get(f"{split}_prefix", None)
        if not prefix:
            raise DataError(f"data.source={kind!r} needs data.{split}_prefix to be set")
        if kind == "text":
            pairs = ParallelText(f"{prefix}.{src}", f"{prefix}.{tgt}")
        else:
            pairs = TSVPairs(_tsv_path(str(prefix)))
    elif kind == "tfds":
        tfds_source = importlib.import_module("data.tfds_source")
        pairs = tfds_source.TFDSPairs(
            data_cfg.get("tfds_name"),
            data_cfg.get(f"tfds_{split}_split", None) or _TFDS_SPLITS[split],
            data_dir=data_cfg.get("tfds_data_dir", None),
            source_lang=src,
            target_lang=tgt,
            download=data_cfg.get("download", False),
        )
    else:
        raise DataError(
            f"unknown data.source {kind!r}; expected 'default', 'text', 'tsv' or 'tfds'"
        )
    if split == "train" and len(pairs) == 0:
        raise DataError(f"the training split is empty: {pairs!r}; expected at least one pair")
    log.info("opened %s split: %r (%d pairs)", split, pairs, len(pairs))
    return pairs
