"""The tokenizer of an imported OPUS-MT (Marian) model, with the project's id conventions.

A Hugging Face Marian directory has two SentencePiece models (``source.spm`` for the encoder's
language, ``target.spm`` for the decoder's) whose pieces map to ids through one ``vocab.json``
shared by both sides. Marian's special ids are ``</s>`` = 0 and ``<pad>`` = the last id, and its
decoder starts from ``<pad>``. This project keeps 0 = padding and 1 = EOS everywhere, so the ids
are permuted, one rule for all of them:

    project id = 0            for Marian's pad id p
               = marian + 1   for Marian ids below p   (</s> 0 -> 1, <unk> 1 -> 2, ...)
               = marian       for Marian ids above p   (none when p is the last id, as in OPUS-MT)

The embedding rows are permuted the same way on import (``interop.marian``), so the model is
unchanged. The decoder start (``bos_id``) is 0, Marian's pad: ``Transformer.decode`` takes each
example's first position as real whatever its id, and the searches never emit 0. (A model
trained here and exported to Marian keeps its own ids: pad 0, EOS 1, start 2; the rule above is
then the identity.)

A workdir holding this tokenizer has ``marian_tokenizer.json`` (the special tokens and
languages) beside ``source.spm``, ``target.spm`` and ``vocab.json``, all as Hugging Face wrote
them, so they go back out unchanged on export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data.errors import DataError
from data.tokenizer import EOS_ID, PAD_ID

DESCRIPTOR = "marian_tokenizer.json"
FILES = ("source.spm", "target.spm", "vocab.json")
_SPIECE_UNDERLINE = "\u2581"


def marian_to_project(marian_ids: np.ndarray, pad: int) -> np.ndarray:
    """Marian ids -> project ids (see the module docstring)."""
    marian_ids = np.asarray(marian_ids)
    return np.where(marian_ids == pad, 0, np.where(marian_ids < pad, marian_ids + 1, marian_ids))


def project_to_marian(ids: np.ndarray, pad: int) -> np.ndarray:
    """Project ids -> Marian ids, the inverse of ``marian_to_project``."""
    ids = np.asarray(ids)
    return np.where(ids == 0, pad, np.where(ids <= pad, ids - 1, ids))


class MarianTokenizer:
    """Source text -> ids with ``source.spm``, ids -> target text with ``target.spm``.

    Follows transformers' ``MarianTokenizer``: a leading language code such as ``>>es<<`` is
    one token; pieces missing from ``vocab.json`` become ``<unk>``; decoding drops the special
    tokens. Ids are the project's (see the module docstring).

    Args:
      source_spm, target_spm: serialized SentencePiece models.
      vocab: ``vocab.json``, piece -> Marian id, ids 0..V-1 each once.
      pad_token, eos_token, unk_token: the special pieces (``tokenizer_config.json``'s).
      decoder_start_token: the decoder's first input (default: the pad token, as in OPUS-MT).
      source_lang, target_lang: kept for the export's ``tokenizer_config.json``.
      where: the directory the files came from, for error messages.

    Raises:
      DataError: the vocabulary is not a permutation of 0..V-1, lacks a special token, or its
        ``</s>`` does not become the project's EOS id 1 (Marian id 0, or 1 with pad 0).
    """

    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(
        self,
        source_spm: bytes,
        target_spm: bytes,
        vocab: dict[str, int],
        *,
        pad_token: str = "<pad>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        decoder_start_token: str | None = None,
        source_lang: str | None = None,
        target_lang: str | None = None,
        where: str = "vocab.json",
    ):
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise DataError(f"{where}: the ids are not 0..{len(ids) - 1}, each once")
        decoder_start_token = pad_token if decoder_start_token is None else decoder_start_token
        self.special_tokens = {
            "pad_token": pad_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
        }
        for name, token in (*self.special_tokens.items(), ("start", decoder_start_token)):
            if token not in vocab:
                raise DataError(f"{where}: {name} {token!r} is not in the vocabulary")
        if marian_to_project(vocab[eos_token], vocab[pad_token]) != EOS_ID:
            raise DataError(
                f"{where}: eos_token {eos_token!r} has id {vocab[eos_token]} and pad_token "
                f"{vocab[pad_token]}; supported: eos 0 (OPUS-MT's), or eos 1 with pad 0"
            )
        self.decoder_start_token = decoder_start_token
        self.languages = {"source_lang": source_lang, "target_lang": target_lang}
        self.marian_pad = vocab[pad_token]
        self.files: dict[str, Path] = {}  # where the files were read from, if they were
        self.vocab = dict(vocab)
        self._source_proto, self._target_proto = source_spm, target_spm
        self._source = spm.SentencePieceProcessor(model_proto=source_spm)
        self._target = spm.SentencePieceProcessor(model_proto=target_spm)
        self._pieces = [""] * len(vocab)  # project id -> piece
        for piece, marian_id in vocab.items():
            self._pieces[int(marian_to_project(marian_id, self.marian_pad))] = piece
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        self.unk_id = self._ids[unk_token]
        self.bos_id = self._ids[decoder_start_token]
        specials = (pad_token, eos_token, unk_token, decoder_start_token)
        self._specials = {self._ids[t] for t in specials}

    @classmethod
    def from_files(cls, directory: str | Path, **special_tokens) -> MarianTokenizer:
        """Reads ``source.spm``, ``target.spm`` and ``vocab.json`` from ``directory``."""
        directory = Path(directory)
        for name in FILES:
            if not (directory / name).is_file():
                raise DataError(f"{directory / name}: missing (a Marian tokenizer needs {FILES})")
        try:
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{directory / 'vocab.json'}: not valid JSON ({err})") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise DataError(f"{directory / 'vocab.json'}: expected an object of piece -> int id")
        tokenizer = cls(
            (directory / "source.spm").read_bytes(),
            (directory / "target.spm").read_bytes(),
            vocab,
            where=str(directory / "vocab.json"),
            **special_tokens,
        )
        tokenizer.files = {name: directory / name for name in FILES}
        return tokenizer

    @classmethod
    def load(cls, workdir: str | Path) -> MarianTokenizer:
        """The tokenizer a workdir holds (``save`` wrote it)."""
        path = Path(workdir) / DESCRIPTOR
        try:
            descriptor = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer descriptor not found") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        return cls.from_files(
            workdir,
            **descriptor["special_tokens"],
            **descriptor["languages"],
            decoder_start_token=descriptor["decoder_start_token"],
        )

    def _write_files(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "source.spm").write_bytes(self._source_proto)
        (directory / "target.spm").write_bytes(self._target_proto)
        text = json.dumps(self.vocab, ensure_ascii=False, indent=2)
        (directory / "vocab.json").write_text(text, encoding="utf-8")

    def save(self, workdir: str | Path) -> None:
        """Writes the tokenizer's files into ``workdir`` (the descriptor last)."""
        workdir = Path(workdir)
        self._write_files(workdir)
        descriptor = {
            "kind": "marian",
            "special_tokens": self.special_tokens,
            "decoder_start_token": self.decoder_start_token,
            "languages": self.languages,
        }
        tmp = workdir / f".{DESCRIPTOR}.tmp"
        tmp.write_text(json.dumps(descriptor, indent=2) + "\n")
        tmp.replace(workdir / DESCRIPTOR)

    def save_hf(self, directory: str | Path, *, model_max_length: int = 512) -> None:
        """Writes the files transformers' ``MarianTokenizer.from_pretrained`` reads."""
        directory = Path(directory)
        self._write_files(directory)
        config = {
            "tokenizer_class": "MarianTokenizer",
            **self.special_tokens,
            **self.languages,
            "model_max_length": model_max_length,
            "separate_vocabs": False,
        }
        if self.decoder_start_token not in self.special_tokens.values():
            # So that decoding with skip_special_tokens drops it (models trained here start
            # from <s>).
            config["additional_special_tokens"] = [self.decoder_start_token]
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[int(token_id)]

    def _to_ids(self, pieces: Iterable[str]) -> list[int]:
        return [self._ids.get(p, self.unk_id) for p in pieces]

    def encode(self, text: str, *, side: str = "source") -> list[int]:
        """Ids of ``text`` without EOS; ``side="target"`` uses the target language's model."""
        return self.encode_batch([text], side=side)[0]

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = -1, *, side: str = "source"
    ) -> list[list[int]]:
        """``encode`` for many texts with SentencePiece's thread pool."""
        if side not in ("source", "target"):
            raise ValueError(f"side={side!r}; expected 'source' or 'target'")
        codes, bodies = [], []
        for text in texts:
            code, body = [], text
            # transformers' remove_language_code: a leading ">>xx<<" is one token.
            if side == "source" and text.startswith(">>") and (end := text.find("<<")) != -1:
                code, body = [text[: end + 2]], text[end + 2 :]
            codes.append(code)
            bodies.append(body)
        sp = self._source if side == "source" else self._target
        pieces = sp.encode(bodies, out_type=str, num_threads=num_threads)
        return [self._to_ids(c + p) for c, p in zip(codes, pieces, strict=True)]

    def decode(self, ids: Iterable[int]) -> str:
        """Target text of ``ids`` up to the first EOS, special tokens dropped (as
        ``MarianTokenizer.decode(..., skip_special_tokens=True)``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        eos = np.flatnonzero(ids == EOS_ID)
        if len(eos):
            ids = ids[: eos[0]]
        pieces = [self._pieces[i] for i in ids.tolist() if i not in self._specials]
        text = self._target.decode_pieces(pieces)
        return text.replace(_SPIECE_UNDERLINE, " ").strip()

    def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(r) for r in rows]
