"""Tests of the default-corpus builder (`data.bible`) and its OSIS cleaner (`data.osis`)."""

import hashlib
import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from data import bible, osis

# Fingerprints of the reference build's train/dev books (the full corpus is too big to ship).
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "bible_reference_blocks.json"


# --- the markup cleaner -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # Strong's numbers and morphology live in attributes; the words stay.
        (
            '<w lemma="strong:H0430" morph="x">God</w> <w lemma="strong:H1254">created</w>.',
            "God created.",
        ),
        # A footnote between two words becomes a space; beside a space or punctuation, nothing.
        ('God<note placement="foot">Hebrew: <i>Elohim</i></note><w>created</w>', "God created"),
        ('said <note type="crossReference">Gen 1:1</note> “Let', "said “Let"),
        ("earth<note>1:2 or land</note>.", "earth."),
        ("<note/>Amen.", "Amen."),
        # Section headings go; canonical psalm titles are verse text in the RV1909, so stay.
        ('<title type="main">The Creation</title>In the beginning', "In the beginning"),
        ("<title>Psalm 3</title>Yahweh", "Yahweh"),
        (
            '<title canonical="true" type="psalm">A Psalm by <w>David</w>.</title> <lg/><l/>Yahweh',
            "A Psalm by David. Yahweh",
        ),
        ("<speaker>Beloved</speaker>Let him kiss me", "Let him kiss me"),
        # Entities, block tags, odd white space.
        ("Tom &amp; Jerry &lt;3 &#8220;hi&#8221;", "Tom & Jerry <3 “hi”"),
        ("a<lb/>b<l level='1'/>c\n\td\u00a0e\u200bf", "a b c d e f"),
        ('word<l eID="x"/>, next', "word, next"),
        ("Cafe\u0301", "Café"),  # NFC
        ('<div type="x-milestone"/> ', ""),
        # RV1909: a space between a word and a translator's addition, except an enclitic.
        ('<w>engendró</w><transChange type="added">un hijo</transChange>', "engendró un hijo"),
        ("<w>sáca</w><transChange>lo</transChange>", "sácalo"),
        ("<w>allí</w><transChange>la</transChange>", "allí la"),
        ("<w>casa</w><transChange>la</transChange>", "casa la"),  # not a verb
        ("<transChange>el</transChange><w>rey</w>", "el rey"),
    ],
)
def test_clean_osis(raw, expected):
    assert osis.clean_osis(raw) == expected


def test_parse_imp_skips_headings_intros_and_unknown_books():
    dump = [
        "$$$[ Module Heading ]",
        "<milestone/>",
        "$$$Genesis 0:0",
        "<title>Preface</title>",
        "$$$Genesis 1:0",
        '<chapter n="1"/>',
        "$$$Genesis 1:1",
        "In the",
        "beginning",
        "$$$Tobit 1:1",
        "Deuterocanon",
        "$$$I John 5:7",
        "<w>For</w>",
    ]
    assert list(osis.parse_imp(dump)) == [
        ("Gen", 1, 1, "In the\nbeginning"),
        ("1John", 5, 7, "<w>For</w>"),
    ]
    assert osis.read_module(dump + ["$$$Ruth 1:2", "<note>only a note</note>"]) == {
        ("Gen", 1, 1): "In the beginning",
        ("1John", 5, 7): "For",
    }


# --- split rules --------------------------------------------------------------------------------


def test_split_rules_are_by_whole_book():
    splits = {book: bible.split_of(book) for book in osis.BOOK_IDS}
    assert len(splits) == 66
    assert {b for b, s in splits.items() if s == "dev"} == set(bible.DEV_BOOKS)
    assert {b for b, s in splits.items() if s == "test"} == set(bible.TEST_BOOKS)
    assert set(bible.DEV_BOOKS) == {"Eccl", "Lam", "Joel", "Hab", "Gal", "Phil", "1John", "Titus"}
    assert set(bible.TEST_BOOKS) == {"Ruth", "Esth", "Jonah", "Acts", "Jas", "1Pet"}
    assert sum(s == "train" for s in splits.values()) == 66 - 8 - 6


def test_write_corpus_puts_each_book_in_its_split(tmp_path):
    pairs = [
        bible.Pair(book, 1, v, v, f"{book} {v}", f"{book} es {v}")
        for book in ("Gen", "Ruth", "Titus", "Jonah", "Rev")
        for v in (1, 2)
    ]
    manifest = bible.write_corpus(tmp_path, pairs, ["Gen", "Ruth", "Titus", "Jonah", "Rev"])
    assert manifest["counts"] == {"train": 4, "dev": 2, "test": 4}
    books = {s: {line.split()[0] for line in _lines(tmp_path / f"{s}.en")} for s in bible.SPLITS}
    assert books == {"train": {"Gen", "Rev"}, "dev": {"Titus"}, "test": {"Ruth", "Jonah"}}
    assert _lines(tmp_path / "test.es")[0] == "Ruth es 1"
    assert _lines(tmp_path / "test.ref")[0] == "Ruth.1.1\tRuth.1.1"


# --- alignment of differently numbered chapters -------------------------------------------------


def _toy_bible(seed=0, chapters=30, verses=20):
    """English and 'Spanish' verses of made-up words, each Spanish word a translation of one
    English word (with its own length), so that the aligner can learn a lexicon."""
    rng = random.Random(seed)
    spanish = {f"e{k:03d}x": f"s{k:03d}" + "a" * rng.randrange(4) for k in range(300)}
    words = sorted(spanish)
    en = {}
    for ch in range(1, chapters + 1):
        for v in range(1, verses + 1):
            en["Gen", ch, v] = " ".join(rng.sample(words, rng.randrange(5, 12)))

    def translate(text):
        return " ".join(spanish[w] for w in text.split()[::-1])

    es = {k: translate(t) for k, t in en.items()}
    return en, es, translate


def test_align_follows_renumbered_and_merged_verses():
    en, es, translate = _toy_bible()
    # Chapter 13 renumbered: the Spanish starts it with the last English verse of chapter 12.
    del es["Gen", 12, 20], es["Gen", 13, 20]
    for v in range(20, 1, -1):
        es["Gen", 13, v] = translate(en["Gen", 13, v - 1])
    es["Gen", 13, 1] = translate(en["Gen", 12, 20])
    # Chapter 20: the Spanish verse 5 is English verses 5 and 6; later verses shift down.
    del es["Gen", 20, 20]
    es["Gen", 20, 5] = translate(en["Gen", 20, 5] + " " + en["Gen", 20, 6])
    for v in range(6, 20):
        es["Gen", 20, v] = translate(en["Gen", 20, v + 1])
    pairs, stats = bible.align(en, es)
    assert all(translate(p.en) == p.es for p in pairs), "a misaligned pair got in"
    got = {(p.chapter, p.en_verse): p.es_verse for p in pairs}
    assert [got[13, v] for v in range(1, 20)] == list(range(2, 21))
    assert (12, 20) not in got and (20, 5) not in got and (20, 6) not in got
    assert [got[20, v] for v in range(7, 21)] == list(range(6, 20))
    assert len(pairs) == 30 * 20 - 1 - 1 - 2  # only the unmatched and merged verses lost
    assert stats["kept_renumbered"] == 19 + 14 and stats["bead_21"] == 1


def test_align_drops_an_isolated_renumbered_pair_and_unrelated_verses():
    en, es, translate = _toy_bible(seed=1)
    es["Gen", 7, 9], es["Gen", 7, 10] = es["Gen", 7, 10], es["Gen", 7, 9]  # swapped
    es["Gen", 8, 4] = translate(en["Gen", 9, 4])  # a verse that is no translation
    pairs, stats = bible.align(en, es, books=["Gen"])
    assert all(translate(p.en) == p.es for p in pairs)
    got = {(p.chapter, p.en_verse) for p in pairs}
    assert not got & {(7, 9), (7, 10), (8, 4)}
    assert len(pairs) == 30 * 20 - 3
    assert bible.align(en, es, books=["Exod"])[0] == []


# --- caching, atomic builds, the prebuilt copy --------------------------------------------------


def _fake_build(calls, fail=False):
    def build(out_dir, books=None):
        calls.append(Path(out_dir))
        pairs = [bible.Pair(b, 1, 1, 1, f"{b} en", f"{b} es") for b in ("Gen", "Gal", "Acts")]
        bible.write_corpus(out_dir, pairs, osis.BOOK_IDS)
        if fail:  # interrupted after writing everything but before the rename
            raise KeyboardInterrupt

    return build


def test_ensure_default_corpus_builds_once_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv(bible.ENV_VAR, raising=False)
    calls = []
    monkeypatch.setattr(bible, "build_corpus", _fake_build(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        bible.ensure_default_corpus(tmp_path)
    assert list(tmp_path.iterdir()) == [], "an interrupted build left files behind"
    (tmp_path / bible.CORPUS_NAME).mkdir()  # a damaged copy (no manifest) is rebuilt
    (tmp_path / bible.CORPUS_NAME / "train.en").write_text("partial\n")
    monkeypatch.setattr(bible, "build_corpus", _fake_build(calls))
    path = bible.ensure_default_corpus(tmp_path)
    assert path == tmp_path / bible.CORPUS_NAME and len(calls) == 2
    assert path.stat().st_mode & 0o777 == 0o755
    assert calls[-1].parent == tmp_path and calls[-1] != path  # built beside, then renamed
    assert _lines(path / "train.en") == ["Gen en"] and _lines(path / "test.es") == ["Acts es"]
    assert json.loads((path / bible.MANIFEST).read_text())["counts"]["dev"] == 1
    assert bible.ensure_default_corpus(str(tmp_path)) == path and len(calls) == 2  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == [bible.CORPUS_NAME]


def test_ensure_default_corpus_uses_a_prebuilt_copy(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bible, "build_corpus", _fake_build(calls))
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    for name in ("train.en", "train.es", "dev.en", "dev.es"):
        (prebuilt / name).write_text("x\n")
    monkeypatch.setenv(bible.ENV_VAR, str(prebuilt))
    assert bible.ensure_default_corpus(tmp_path / "cache") == prebuilt and not calls
    (prebuilt / "dev.es").unlink()  # incomplete: build the usual way instead
    assert bible.ensure_default_corpus(tmp_path / "cache") == tmp_path / "cache" / "bible-en-es"
    assert len(calls) == 1


def test_build_corpus_rejects_unknown_books(tmp_path):
    with pytest.raises(ValueError, match="Genesis"):
        bible.build_corpus(tmp_path, books=["Genesis"])


# --- installing the SWORD tools -----------------------------------------------------------------


@pytest.fixture
def no_sword(tmp_path, monkeypatch):
    """A machine without the SWORD modules and mod2imp; returns the `which` table to edit."""
    monkeypatch.setattr(osis, "_SWORD_DIRS", (tmp_path / "sword",))
    found = {}
    monkeypatch.setattr(osis.shutil, "which", found.get)
    return found


def _assert_helpful(error):
    message = str(error)
    assert isinstance(error, RuntimeError)
    assert osis.APT_COMMAND in message and "mod2imp" in message and "spaRV1909eb" in message
    assert "--config.data.source=text --config.data.train_prefix=PATH/train" in message
    assert "--config.data.dev_prefix=PATH/dev" in message and bible.ENV_VAR in message


def test_clear_error_without_apt(no_sword, tmp_path, monkeypatch):
    monkeypatch.setattr(osis.subprocess, "run", None)  # nothing may be run
    monkeypatch.delenv(bible.ENV_VAR, raising=False)
    with pytest.raises(bible.CorpusBuildError, match="apt-get is not available") as error:
        bible.ensure_default_corpus(tmp_path / "data")
    _assert_helpful(error.value)
    assert not (tmp_path / "data" / bible.CORPUS_NAME).exists()


def test_clear_error_when_not_root(no_sword, monkeypatch):
    no_sword["apt-get"] = "/usr/bin/apt-get"
    monkeypatch.setattr(osis.os, "geteuid", lambda: 1000)
    with pytest.raises(bible.CorpusBuildError, match="needs root") as error:
        osis.ensure_sword()
    _assert_helpful(error.value)


def test_installs_with_apt_when_root(no_sword, tmp_path, monkeypatch):
    no_sword["apt-get"] = "/usr/bin/apt-get"
    monkeypatch.setattr(osis.os, "geteuid", lambda: 0)
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if command[1] == "install" and len(commands) > 1:  # needs `apt-get update` first
            (tmp_path / "sword" / "mods.d").mkdir(parents=True)
            for module in (osis.SOURCE_MODULE, osis.TARGET_MODULE):
                (tmp_path / "sword" / "mods.d" / f"{module}.conf").write_text("Version=1\n")
            no_sword["mod2imp"] = "/usr/bin/mod2imp"
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, int(command[1] == "install"), "", "E: 404")

    monkeypatch.setattr(osis.subprocess, "run", run)
    assert osis.ensure_sword() == "/usr/bin/mod2imp"
    install = osis.APT_COMMAND.split()
    assert commands == [install, ["apt-get", "update"], install]
    assert install[-3:] == ["sword-text-web", "sword-text-sparv", "libsword-utils"]
    assert osis.module_version(osis.TARGET_MODULE) == "1"


# --- a real build of a few books ----------------------------------------------------------------

BOOKS = ["Ruth", "Ps", "Hos", "Jonah", "Titus", "Phlm"]
COUNTS = {"Ruth": 85, "Ps": 2453, "Hos": 194, "Jonah": 45, "Titus": 44, "Phlm": 24}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds six books for real (installing the SWORD packages with apt if needed)."""
    out = tmp_path_factory.mktemp("bible")
    manifest = bible.build_corpus(out, books=BOOKS)
    rows = {}
    for split in bible.SPLITS:
        files = [_lines(out / f"{split}.{ext}") for ext in ("ref", "en", "es")]
        assert len({len(f) for f in files}) == 1, f"{split} files are not parallel"
        for ref, en, es in zip(*files, strict=True):
            rows.setdefault(ref.split(".")[0], []).append((ref, en, es))
    return manifest, rows


def test_real_build_counts_and_splits(built):
    manifest, rows = built
    assert {book: len(r) for book, r in rows.items()} == COUNTS
    assert manifest["counts"] == {"train": 2453 + 194 + 24, "dev": 44, "test": 85 + 45}
    assert all(manifest["modules"][m] for m in ("engWEB2015eb", "spaRV1909eb"))  # versions
    assert manifest["alignment"]["renumbered_chapters"] == ["Hos.12", "Jonah.2"]


def test_real_build_pairs_are_clean_and_sensible(built):
    _, rows = built
    markup = re.compile(r"[<>]|&#?\w+;|strong:|lemma|\b[HG]\d{4}\b|\s\s|^\s|\s$")
    for ref, en, es in (row for book_rows in rows.values() for row in book_rows):
        assert en and es and not markup.search(en) and not markup.search(es), ref
        assert 0.4 < len(es) / len(en) < 2.5, (ref, en, es)
    ruth = {ref: (en, es) for ref, en, es in rows["Ruth"]}
    assert ruth["Ruth.1.1\tRuth.1.1"][1].startswith("Y ACONTECIÓ en los días que gobernaban")
    psalm3 = {ref: (en, es) for ref, en, es in rows["Ps"]}["Ps.3.1\tPs.3.1"]
    assert psalm3[0].startswith("A Psalm by David, when he fled from Absalom his son. Yahweh")
    assert psalm3[1].startswith("Salmo de David, cuando huía de delante de Absalom su hijo.")


def test_real_build_follows_renumbered_chapters(built):
    _, rows = built
    jonah = {ref: (en, es) for ref, en, es in rows["Jonah"]}
    en, es = jonah["Jonah.2.1\tJonah.2.2"]  # RV1909 Jonah 2:1 is WEB 1:17 (another chapter)
    assert en.startswith("Then Jonah prayed to Yahweh") and es.startswith("Y oró Jonás")
    # RV1909 2:10 is WEB 2:9-10 (a 2-1 bead): neither is kept.
    chapter2 = [ref for ref in jonah if ref.startswith("Jonah.2.")]
    assert chapter2 == [f"Jonah.2.{v}\tJonah.2.{v + 1}" for v in range(1, 9)]
    hosea = [ref.split("\t") for ref, _, _ in rows["Hos"] if ref.startswith("Hos.12.")]
    assert hosea and all(int(es.split(".")[2]) == int(en.split(".")[2]) + 1 for en, es in hosea)


def test_real_build_matches_the_reference(built):
    """Each built train/dev book equals its block of the reference build, pair for pair."""
    _, rows = built
    reference = json.loads(REFERENCE.read_text())["books"]
    built_books = {b for b in BOOKS if bible.split_of(b) in ("train", "dev")}
    assert set(reference) == built_books
    for book, expected in reference.items():
        assert bible.split_of(book) == expected["split"], book
        text = "".join(f"{en}\t{es}\n" for _, en, es in rows[book])
        assert len(rows[book]) == expected["pairs"], book
        assert hashlib.sha256(text.encode()).hexdigest() == expected["sha256"], book


def _lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()
