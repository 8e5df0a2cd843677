"""Tests for data.sources: parallel text, TSV, bad input, and open_split."""

import logging
import sys
import types
from pathlib import Path

import ml_collections
import pytest

from data.errors import DataError
from data.sources import ParallelText, TSVPairs, open_split


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def test_parallel_text_reads_pairs_in_order(tmp_path):
    write(tmp_path / "a.en", "one\ntwo\nthree\n")
    write(tmp_path / "a.es", "uno\ndos\ntres\n")
    pairs = ParallelText(tmp_path / "a.en", tmp_path / "a.es")
    assert len(pairs) == 3
    assert [pairs[i] for i in range(3)] == [("one", "uno"), ("two", "dos"), ("three", "tres")]


def test_crlf_bom_and_missing_final_newline(tmp_path):
    write(tmp_path / "a.en", b"\xef\xbb\xbfHello\r\nWorld\r\n")
    write(tmp_path / "a.es", "Hola\nMundo")
    pairs = ParallelText(tmp_path / "a.en", tmp_path / "a.es")
    assert [pairs[0], pairs[1]] == [("Hello", "Hola"), ("World", "Mundo")]


def test_only_newline_ends_a_line(tmp_path):
    # str.splitlines would split at U+2028 / U+0085 and misalign the two files.
    write(tmp_path / "a.en", "a\u2028b\x85c\nd\n")
    write(tmp_path / "a.es", "x\ny\n")
    pairs = ParallelText(tmp_path / "a.en", tmp_path / "a.es")
    assert pairs[0] == ("a\u2028b\x85c", "x")
    assert pairs[1] == ("d", "y")


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    src = write(tmp_path / "a.en", "1\n2\n3\n")
    tgt = write(tmp_path / "a.es", "1\n2\n")
    with pytest.raises(DataError) as e:
        ParallelText(src, tgt)
    msg = str(e.value)
    assert str(src) in msg and str(tgt) in msg
    assert "3 lines" in msg and "2 lines" in msg


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path / "a.en", b"fine\nalso fine\nbad \xff byte\n")
    write(tmp_path / "a.es", "1\n2\n3\n")
    with pytest.raises(DataError, match=rf"{src}:3: invalid UTF-8"):
        ParallelText(src, tmp_path / "a.es")


def test_missing_file_names_path(tmp_path):
    write(tmp_path / "a.en", "x\n")
    with pytest.raises(DataError, match=str(tmp_path / "a.es")):
        ParallelText(tmp_path / "a.en", tmp_path / "a.es")


def test_empty_and_blank_pairs_are_dropped_and_counted(tmp_path, caplog):
    write(tmp_path / "a.en", "keep\n\n  \t \nkeep too\nsrc only\n\u3000\n")
    write(tmp_path / "a.es", "sí\nempty src\nblank src\ntambién\n \nideographic space\n")
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        pairs = ParallelText(tmp_path / "a.en", tmp_path / "a.es")
    assert [pairs[i] for i in range(len(pairs))] == [("keep", "sí"), ("keep too", "también")]
    assert "dropped 4 of 6 pairs" in caplog.text


def test_drop_empty_false_keeps_blank_pairs(tmp_path):
    write(tmp_path / "a.en", "a\n\n")
    write(tmp_path / "a.es", "b\nc\n")
    assert len(ParallelText(tmp_path / "a.en", tmp_path / "a.es", drop_empty=False)) == 2


def test_tsv_pairs(tmp_path, caplog):
    path = write(tmp_path / "d.tsv", b"\xef\xbb\xbfa b\tc d\r\n\nx\t \nsolo\tpar\n")
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        pairs = TSVPairs(path)
    assert [pairs[i] for i in range(len(pairs))] == [("a b", "c d"), ("solo", "par")]
    assert "dropped 2 of 4 pairs" in caplog.text


@pytest.mark.parametrize("bad_line", ["no tab here", "one\ttwo\tthree"])
def test_tsv_line_without_exactly_one_tab(tmp_path, bad_line):
    path = write(tmp_path / "d.tsv", f"ok\tfine\nalso\tok\n{bad_line}\n")
    with pytest.raises(DataError, match=rf"{path}:3: found \d tabs, expected exactly one"):
        TSVPairs(path)


def test_open_split_text_and_tsv(tmp_path):
    write(tmp_path / "train.de", "a\nb\n")
    write(tmp_path / "train.fr", "c\nd\n")
    cfg = config(
        source="text", train_prefix=str(tmp_path / "train"), source_lang="de", target_lang="fr"
    )
    assert open_split(cfg, "train")[1] == ("b", "d")
    write(tmp_path / "dev.tsv", "x\ty\n")
    cfg = config(source="tsv", dev_prefix=str(tmp_path / "dev"))
    assert open_split(cfg, "dev")[0] == ("x", "y")
    cfg.dev_prefix = str(tmp_path / "dev.tsv")
    assert len(open_split(cfg, "dev")) == 1


def test_open_split_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data.source 'csv'"):
        open_split(config(source="csv"), "train")
    with pytest.raises(DataError, match="unknown split"):
        open_split(config(source="text"), "validation")
    with pytest.raises(DataError, match="train_prefix"):
        open_split(config(source="text"), "train")
    write(tmp_path / "t.en", "\n \n")
    write(tmp_path / "t.es", "\n\n")
    with pytest.raises(DataError, match="training split is empty"):
        open_split(config(source="text", train_prefix=str(tmp_path / "t")), "train")


def test_open_split_default_uses_the_bible_builder(tmp_path, monkeypatch):
    write(tmp_path / "dev.en", "Jesus wept.\n")
    write(tmp_path / "dev.es", "Y lloró Jesús.\n")
    calls = []
    fake = types.ModuleType("data.bible")
    fake.ensure_default_corpus = lambda data_dir: calls.append(data_dir) or tmp_path
    monkeypatch.setitem(sys.modules, "data.bible", fake)
    pairs = open_split(config(source="default", data_dir="/cache"), "dev")
    assert calls == ["/cache"]
    assert pairs[0] == ("Jesus wept.", "Y lloró Jesús.")


def test_open_split_tfds_is_lazy_and_maps_split_names(monkeypatch):
    seen = {}

    class FakePairs(list):
        def __init__(self, name, split, **kwargs):
            seen.update(name=name, split=split, **kwargs)
            super().__init__([("a", "b")])

    fake = types.ModuleType("data.tfds_source")
    fake.TFDSPairs = FakePairs
    monkeypatch.setitem(sys.modules, "data.tfds_source", fake)
    cfg = config(
        source="tfds",
        tfds_name="wmt14_translate/de-en",
        tfds_data_dir="/tfds",
        source_lang="en",
        target_lang="de",
        download=False,
    )
    assert open_split(cfg, "dev")[0] == ("a", "b")
    assert seen == dict(
        name="wmt14_translate/de-en",
        split="validation",
        data_dir="/tfds",
        source_lang="en",
        target_lang="de",
        download=False,
    )


def test_tiny_fixture_corpus(tiny_corpus):
    pairs = open_split(config(source="text", train_prefix=str(tiny_corpus / "train")), "train")
    assert len(pairs) == 2000
    src, tgt = pairs[0]
    assert src.startswith("God called") and tgt.startswith("Y llamó Dios")
