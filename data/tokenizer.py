"""SentencePiece subword tokenizer: one vocabulary shared by source and target.

The model is trained once on the training pairs (both sides), saved to a file and reused. Ids
are fixed across the project: 0 = padding, 1 = end of sentence, 2 = beginning of sentence
(the decoder's start token), 3 = unknown.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data.errors import DataError

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """Text <-> ids with a SentencePiece model.

    Args:
        model_proto: A serialized SentencePiece model using the project's special ids.

    Raises:
        DataError: The model's special ids differ from the project's.
    """

    pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID

    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        found = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
        if found != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise DataError(
                f"SentencePiece model has (pad, eos, bos, unk) ids {found}; "
                f"expected {(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}"
            )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Loads a model file written by `train_tokenizer` or `save`."""
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer model not found") from None

    def save(self, path: str | Path) -> None:
        """Writes the model to `path` atomically (e.g. to copy it into a workdir)."""
        _write_atomic(Path(path), self._proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, *, side: str = "source") -> list[int]:
        """Returns the ids of `text`, without BOS or EOS.

        `side` ('source' or 'target') says which language the text is in; one model serves
        both here (tokenizers with one model per side, such as Marian's, use it).
        """
        return self._sp.encode(text)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = -1, *, side: str = "source"
    ) -> list[list[int]]:
        """Like `encode` for many texts, using SentencePiece's C++ thread pool."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece of one id (for labelling plots)."""
        return self._sp.id_to_piece(int(token_id))

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids` up to the first EOS; padding and BOS are skipped.

        Args:
            ids: [T] ints, e.g. one row of decoder output.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        eos = np.flatnonzero(ids == EOS_ID)
        if len(eos):
            ids = ids[: eos[0]]
        ids = ids[(ids != PAD_ID) & (ids != BOS_ID)]
        return self._sp.decode(ids.tolist())

    def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """`decode` for each row of a [B, T] array (or a list of id lists)."""
        return [self.decode(r) for r in rows]


def _write_atomic(path: Path, data: bytes) -> None:
    # Write-then-rename so a concurrent reader (another host, a crashed run) never sees half a
    # model.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sample_sentences(pairs: Sequence[tuple[str, str]], max_sentences: int, seed: int):
    """Both sides of (a seeded random subset of) the pairs, at most `max_sentences` strings."""
    n = len(pairs)
    if 2 * n > max_sentences:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(n, size=max(1, max_sentences // 2), replace=False))
    else:
        indices = range(n)

    def sentences() -> Iterator[str]:
        for i in indices:
            src, tgt = pairs[int(i)]
            yield src
            yield tgt

    return sentences(), len(indices)


def train_tokenizer(
    pairs: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    seed: int = 0,
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9999,
    normalization: str = "nmt_nfkc",
) -> Tokenizer:
    """Trains a shared source/target SentencePiece model and saves it to `path`.

    The result depends only on the pairs and the arguments (training twice gives byte-identical
    files): the subset for huge corpora is drawn with `seed`, and SentencePiece's own random
    generator is seeded too.

    Args:
        pairs: Training pairs; both sides are used.
        path: Where to write the model file.
        vocab_size: Number of pieces, special ids included.
        model_type: 'bpe' (the paper's choice) or 'unigram'.
        seed: Seed for subsampling and for SentencePiece.
        max_sentences: Cap on training sentences (both sides counted); larger corpora are
            subsampled, as SentencePiece's memory grows with its input.
        character_coverage: Fraction of characters covered by the vocabulary; rarer characters
            map to UNK.
        normalization: SentencePiece normalization rule ('nmt_nfkc', 'identity', ...).

    Returns:
        The trained tokenizer.

    Raises:
        DataError: No pairs, or SentencePiece rejected the settings (e.g. a vocabulary too large
            for the corpus).
    """
    if len(pairs) == 0:
        raise DataError("cannot train a tokenizer on an empty training set")
    sentences, n_pairs = _sample_sentences(pairs, max_sentences, seed)
    log.info("training a %d-piece %s tokenizer on %d pairs", vocab_size, model_type, n_pairs)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            normalization_rule_name=normalization,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            input_sentence_size=0,  # We subsample ourselves, deterministically.
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed for {path}: {e}") from None
    _write_atomic(Path(path), model.getvalue())
    return Tokenizer(model.getvalue())


def trained_vocab_size(path: str | Path) -> int:
    """The ``vocab_size`` a SentencePiece model file was trained with (its ``trainer_spec``).

    Raises:
        DataError: The file is not a SentencePiece model.
    """
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except DecodeError:
        raise DataError(f"{path}: not a SentencePiece model") from None
    return proto.trainer_spec.vocab_size


def load_or_train(path: str | Path, pairs: Sequence[tuple[str, str]], **kwargs) -> Tokenizer:
    """Loads the tokenizer at `path`, training it on `pairs` first if the file does not exist.

    Args:
        path: The model file.
        pairs: Training pairs, only read if training is needed.
        **kwargs: Passed to `train_tokenizer`.
    """
    path = Path(path)
    if path.exists():
        log.info("loading tokenizer %s", path)
        return Tokenizer.load(path)
    return train_tokenizer(pairs, path, **kwargs)
