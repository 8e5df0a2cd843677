"""Tests for data.tokenizer: training, determinism, special ids, caching."""

import io
import random

import pytest
import sentencepiece as spm

from data.errors import DataError
from data.tokenizer import Tokenizer, load_or_train, train_tokenizer

SYLLABLES = "ka lo mi ne su ta ri po de fa gu ve la so ni".split()


def synthetic_pairs(n: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    """Deterministic pseudo-sentences: words of 1-3 syllables, a source and target 'language'."""
    rng = random.Random(seed)

    def sentence(syllables):
        words = (
            "".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(rng.randint(2, 12))
        )
        return " ".join(words) + "."

    return [(sentence(SYLLABLES[:10]), sentence(SYLLABLES[5:])) for _ in range(n)]


class CountingPairs:
    """A sequence of pairs that records which indices were read."""

    def __init__(self, pairs):
        self.pairs, self.read = pairs, set()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        self.read.add(i)
        return self.pairs[i]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(
        synthetic_pairs(), tmp_path_factory.mktemp("tok") / "t.model", vocab_size=120
    )


def test_special_ids_and_vocab_size(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 120


def test_encode_has_no_eos_and_decode_round_trips(tok):
    for src, tgt in synthetic_pairs(50):
        for text in (src, tgt):
            ids = tok.encode(text)
            assert ids and tok.eos_id not in ids and tok.bos_id not in ids
            assert tok.decode(ids) == text
    assert tok.encode_batch(["kafa lo.", "sode ni."]) == [
        tok.encode("kafa lo."),
        tok.encode("sode ni."),
    ]


def test_decode_stops_at_eos_and_skips_pad_and_bos(tok):
    a, b = tok.encode("kafa supo fane."), tok.encode("de veni.")
    assert tok.decode([tok.bos_id, *a, tok.eos_id, *b]) == "kafa supo fane."
    assert tok.decode([tok.pad_id, *a, tok.pad_id]) == "kafa supo fane."
    assert tok.decode([tok.eos_id, *a]) == ""
    assert tok.decode_batch([[*a, 1, 0, 0], [*b, 1, 5, 5]]) == ["kafa supo fane.", "de veni."]


def test_unknown_characters_map_to_unk(tok):
    assert tok.unk_id in tok.encode("kafa 猫")


def test_training_is_deterministic(tmp_path):
    pairs = synthetic_pairs()
    for name in ("a", "b"):
        train_tokenizer(pairs, tmp_path / f"{name}.model", vocab_size=100, max_sentences=300)
    first = (tmp_path / "a.model").read_bytes()
    assert first == (tmp_path / "b.model").read_bytes()
    train_tokenizer(pairs, tmp_path / "c.model", vocab_size=100, max_sentences=300, seed=1)
    # Another seed draws another subset of the corpus, hence (almost surely) another model.
    assert first != (tmp_path / "c.model").read_bytes()


def test_max_sentences_caps_the_pairs_read(tmp_path):
    pairs = CountingPairs(synthetic_pairs())
    train_tokenizer(pairs, tmp_path / "t.model", vocab_size=80, max_sentences=100)
    assert len(pairs.read) == 50  # Both sides of each pair count.


def test_load_or_train_reuses_the_saved_model(tmp_path, tok):
    path = tmp_path / "cached.model"
    tok.save(path)
    # An empty training set would fail if training were attempted.
    again = load_or_train(path, [], vocab_size=999)
    assert again.vocab_size == tok.vocab_size
    assert again.encode("kafa supo fane.") == tok.encode("kafa supo fane.")
    trained = load_or_train(tmp_path / "new.model", synthetic_pairs(), vocab_size=90)
    assert trained.vocab_size == 90 and (tmp_path / "new.model").exists()


def test_errors(tmp_path):
    with pytest.raises(DataError, match="empty training set"):
        train_tokenizer([], tmp_path / "t.model")
    with pytest.raises(DataError, match="SentencePiece training failed"):
        train_tokenizer(synthetic_pairs(20), tmp_path / "t.model", vocab_size=50_000)
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    # A model with SentencePiece's default ids (unk=0, bos=1, eos=2, no pad) is rejected.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for p in synthetic_pairs() for s in p]),
        model_writer=model,
        vocab_size=60,
        minloglevel=2,
    )
    with pytest.raises(DataError, match="expected \\(0, 1, 2, 3\\)"):
        Tokenizer(model.getvalue())
