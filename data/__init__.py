"""Data: sentence pairs -> SentencePiece ids -> packed training batches / padded eval batches.

Modules (each has one job):

- `errors`: `DataError`, raised for every malformed input.
- `sources`: `(source, target)` string pairs from text files, TSV or TFDS (`open_split`).
- `tokenizer`: the shared SentencePiece `Tokenizer` (0 = pad, 1 = EOS, 2 = BOS, 3 = UNK),
  trained once and cached (`load_or_train`).
- `pipeline`: tokenize a process's shard, then packed training batches (`train_dataset`), the
  batch size from a token budget (`rows_per_step`, `packing_fill`) and packing efficiency
  (`batch_stats`).
- `packing`: the epoch planner and grain dataset behind `train_dataset`.
- `bucketed_batches`: padded, length-bucketed batches for evaluation and decoding
  (`padded_batches`) and `restore_order`.
- `bible`, `osis`: build the default English -> Spanish corpus; `tfds_source`: TFDS datasets.

Typical use:

    pairs = data.open_split(cfg.data, "train")
    tok = data.load_or_train(workdir / "tokenizer.model", pairs, vocab_size=8000)
    fill = data.packing_fill(pairs, tok, row_length=128)  # share of row slots holding tokens
    rows = data.rows_per_step(25_000, row_length=128, num_shards=jax.device_count(), fill=fill)
    it = iter(data.train_dataset(pairs, tok, row_length=128, rows=rows // jax.process_count(),
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()))
    batch = next(it)   # [rows, 128] int32: inputs, inputs_segmentation, inputs_position, ...
    state = it.get_state()   # save with the checkpoint; it.set_state(state) resumes exactly

Data config fields read by `open_split` (an `ml_collections.ConfigDict`; missing fields take
the defaults shown):

- `source` ('default'): 'default' (the Bible corpus, built once under `data_dir`), 'text'
  (`PREFIX.{source_lang}` + `PREFIX.{target_lang}`, one sentence per line), 'tsv'
  (`PREFIX.tsv`, or PREFIX itself if it ends in .tsv, `source<TAB>target` per line) or
  'tfds'.
- `train_prefix`, `dev_prefix`, `test_prefix` (None): file prefixes for 'text' and 'tsv'.
- `source_lang` ('en'), `target_lang` ('es'): language codes (file suffixes, TFDS features).
- `data_dir` (None): cache directory of the default corpus (None: `bible.default_data_dir()`).
- `tfds_name` (None): e.g. 'wmt14_translate/de-en'; `tfds_data_dir` (None): TFDS root;
  `download` (False): whether TFDS may download and prepare the dataset;
  `tfds_train_split` / `tfds_dev_split` / `tfds_test_split` ('train' / 'validation' /
  'test'): TFDS split names.
"""

from __future__ import annotations

import importlib
from typing import Any

from data.bucketed_batches import decoding_batches, padded_batches, restore_order
from data.errors import DataError
from data.sources import ParallelText, TSVPairs, open_split
from data.tokenizer import Tokenizer, load_or_train, train_tokenizer

# Imported on first use: they pull in grain (about 2 s), which corpus building and TFDS
# preparation do not need.
_LAZY = {
    "train_dataset": "data.pipeline",
    "encode_pairs": "data.pipeline",
    "rows_per_step": "data.pipeline",
    "packing_fill": "data.pipeline",
    "batch_stats": "data.pipeline",
    "TokenizedPairs": "data.pipeline",
    "PackedBatches": "data.packing",
}

__all__ = [
    "DataError",
    "ParallelText",
    "TSVPairs",
    "Tokenizer",
    "load_or_train",
    "open_split",
    "decoding_batches",
    "padded_batches",
    "restore_order",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
