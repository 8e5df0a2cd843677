"""decode.py: one output line per input line, in order; scores and n-best; clear errors."""

import io
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import decode
from cli import files
from data import DataError, train_tokenizer
from decoding.translate import SearchConfig, Translator
from tests.conftest import REPO
from workdirs.restore import load


def test_every_input_line_gets_one_output_line_in_order(tiny_loaded, tmp_path):
    model, params, tokenizer = tiny_loaded
    long_line = " ".join(["And God said"] * 60)  # far longer than the model's max_positions
    lines = ["In the beginning God created the heavens.", "", long_line, "Jesus wept.", "  "]
    lines += [f"The {n} sons of Israel went out." for n in range(30)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    greedy = Translator(model, tokenizer, SearchConfig(method="greedy"), tokens_per_batch=256)
    out = tmp_path / "out.txt"
    best = decode.translate_file(greedy.translate, params, str(src), str(out), 7, False)
    written = out.read_text(encoding="utf-8").split("\n")
    assert written[-1] == "" and len(written) - 1 == len(lines) == len(best)
    assert written[1] == "" and written[4] == ""  # empty and blank lines stay empty
    # Order: each line's translation equals that line translated on its own.
    for i in (0, 2, 3, 20, 34):
        alone = greedy.translate(params, [lines[i]])[0][0][0]
        assert written[i] == alone, i


def test_n_best_with_scores_format(tiny_loaded, tmp_path):
    model, params, tokenizer = tiny_loaded
    beam = Translator(model, tokenizer, SearchConfig(beam_size=3, n_best=2))
    results = beam.translate(params, ["God is love.", ""])
    line = decode.format_line(results[0], with_scores=True)
    fields = line.split("\t")
    assert len(fields) == 4
    assert float(fields[0]) >= float(fields[2])  # best first
    assert decode.format_line(results[1], with_scores=False) == "\t"  # two empty hypotheses


def test_command_line_translates_and_scores_against_references(tiny_workdir, tiny_corpus, tmp_path):
    src = tmp_path / "dev.en"
    ref = tmp_path / "dev.es"
    src.write_text("".join(open(tiny_corpus / "dev.en").readlines()[:12]))
    ref.write_text("".join(open(tiny_corpus / "dev.es").readlines()[:12]))
    out = tmp_path / "hyp.es"
    result = subprocess.run(
        [sys.executable, "decode.py", f"--workdir={tiny_workdir}", f"--input={src}",
         f"--output={out}", f"--reference={ref}", "--beam_size=2", "--checkpoint=latest",
         "--stopping=count"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(out.read_text().split("\n")) == 13
    assert "BLEU" in result.stderr and "nrefs:1|case:mixed" in result.stderr
    assert "chrF" in result.stderr


def test_missing_pieces_of_the_workdir_are_named(tiny_workdir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_workdir, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing tokenizer: {broken}/tokenizer.model"):
        load(broken)
    shutil.rmtree(broken)
    shutil.copytree(tiny_workdir, broken, ignore=shutil.ignore_patterns("checkpoints", "best"))
    with pytest.raises(FileNotFoundError, match=f"no checkpoints checkpoint in {broken}"):
        load(broken)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 999"):
        load(tiny_workdir, "999")


def test_tokenizer_of_another_size_is_refused(tiny_workdir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_workdir, other)
    pairs = [(f"word{i} and more", f"palabra{i} y mas") for i in range(300)]
    train_tokenizer(pairs, other / "tokenizer.model", vocab_size=300)
    with pytest.raises(ValueError, match="has 300 tokens but .* says vocab_size=500"):
        load(other)


def test_invalid_utf8_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(DataError, match=f"{bad}:3: invalid UTF-8"):
        list(files.read_chunks(str(bad), 10))


def test_crlf_and_bom_are_handled(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n\r\nfour".encode())
    assert list(files.read_chunks(str(path), 2)) == [["one", "two"], ["", "four"]]


def _partials(directory):
    return sorted(directory.glob(".*.partial"))


def test_an_old_output_is_replaced_only_once_the_translation_is_whole(tiny_loaded, tmp_path):
    model, params, tokenizer = tiny_loaded
    src = tmp_path / "in.txt"
    src.write_text("".join(f"The {n} sons of Israel went out.\n" for n in range(20)))
    out = tmp_path / "out.txt"
    out.write_text("OLD\n")
    out.chmod(0o640)
    inode = out.stat().st_ino
    greedy = Translator(model, tokenizer, SearchConfig(method="greedy"))
    seen = []

    def generate(params, chunk, first_line):
        assert out.read_text() == "OLD\n"  # untouched while translating
        [partial] = _partials(tmp_path)
        assert partial.name.startswith(".out.txt.")
        seen.append(partial.read_text().count("\n"))  # the lines done so far, flushed
        return greedy.translate(params, chunk, first_line=first_line)

    best = decode.translate_file(generate, params, str(src), str(out), 6, False)
    assert seen == [0, 6, 12, 18]
    assert out.read_text(encoding="utf-8") == "".join(line + "\n" for line in best)
    assert len(best) == 20
    assert out.stat().st_mode & 0o7777 == 0o640  # the old file's permission bits
    assert out.stat().st_ino != inode  # a new file renamed over the old one
    assert _partials(tmp_path) == []


def _fake_generate(fail_at=None, error=RuntimeError):
    def generate(params, chunk, first_line):
        if fail_at is not None and first_line >= fail_at:
            raise error("simulated")
        return [[(line.upper(), 0.0)] for line in chunk]

    return generate


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("old", [b"KEEP\n", None])
def test_a_failed_translation_leaves_the_old_output_and_no_partial_file(tmp_path, error, old):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {n}\n" for n in range(30)))
    out = tmp_path / "out.txt"
    if old is not None:
        out.write_bytes(old)
    with pytest.raises(error, match="simulated"):
        decode.translate_file(_fake_generate(fail_at=20, error=error), None, str(src), str(out),
                              10, False)  # fmt: skip
    assert (out.read_bytes() if out.exists() else None) == old
    assert _partials(tmp_path) == []


def test_a_new_output_gets_the_umask_mode_and_a_symlink_keeps_pointing(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    previous = os.umask(0o027)
    try:
        decode.translate_file(_fake_generate(), None, str(src), str(tmp_path / "new.txt"), 1,
                              False)  # fmt: skip
    finally:
        os.umask(previous)
    assert (tmp_path / "new.txt").read_text() == "A\nB\n"
    assert (tmp_path / "new.txt").stat().st_mode & 0o7777 == 0o640  # not mkstemp's 0600
    real = tmp_path / "real.txt"
    real.write_text("OLD\n")
    (tmp_path / "link.txt").symlink_to("real.txt")
    decode.translate_file(_fake_generate(), None, str(src), str(tmp_path / "link.txt"), 1, False)
    assert (tmp_path / "link.txt").is_symlink() and real.read_text() == "A\nB\n"
    assert _partials(tmp_path) == []


def test_a_pipe_output_is_written_directly(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    decode.translate_file(_fake_generate(), None, str(src), str(fifo), 1, False)
    reader.join(timeout=30)
    assert got == ["A\nB\n"] and stat.S_ISFIFO(fifo.lstat().st_mode)  # not replaced by a file
    assert _partials(tmp_path) == []


def test_count_lines_counts_as_read_chunks_does_and_checks_utf8_first(tmp_path):
    for content in (b"", b"one", b"one\n", b"\xef\xbb\xbfone\r\ntwo\r\n\r\nfour", b"\n\n"):
        path = tmp_path / "f.txt"
        path.write_bytes(content)
        expected = sum(len(chunk) for chunk in files.read_chunks(str(path), 3))
        assert files.count_lines(str(path)) == expected, content
    bad = tmp_path / "bad.txt"
    bad.write_bytes("é\n".encode() * 5000 + b"cut \xc3\n" + b"fine\n")
    with pytest.raises(DataError, match=f"{bad}:5001: invalid UTF-8 at byte 4"):
        files.count_lines(str(bad))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_a_log_line_per_chunk_otherwise(caplog):
    terminal = _Terminal()
    with files.Progress(35, terminal).active() as progress:
        progress.update(10, 10)
        progress.update(25, 35)
    bar = terminal.getvalue()
    assert "35/35" in bar and "lines/s" in bar and "<" in bar  # done of total, rate, ETA
    plain = io.StringIO()
    with caplog.at_level(logging.INFO, logger="decode"):
        with files.Progress(35, plain).active() as progress:
            progress.update(10, 10)
        with files.Progress(None, plain).active() as progress:
            progress.update(10, 10)
    assert plain.getvalue() == ""
    assert [r.getMessage() for r in caplog.records if r.name == "decode"] == [
        "translated 10 of 35 lines",
        "translated 10 lines",
    ]


def _damage(step_dir):
    for f in (step_dir / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable_one(
    two_checkpoint_workdir, tmp_path, caplog
):
    from workdirs.checkpoint_errors import CheckpointReadError

    work = tmp_path / "W"
    shutil.copytree(two_checkpoint_workdir, work)
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    newest, previous = steps[-1], steps[-2]
    _damage(work / "checkpoints" / str(newest))
    before = _files(work)
    with caplog.at_level(logging.WARNING):
        model, params, tokenizer = load(work)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"checkpoints/{newest}: " in warnings[0]
    assert f"using step {previous}, the newest readable one" in warnings[0]
    _, expected, _ = load(two_checkpoint_workdir, str(previous))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    greedy = Translator(model, tokenizer, SearchConfig(method="greedy"))
    assert greedy.translate(params, ["God is love."])[0][0][0]  # it translates
    with pytest.raises(
        CheckpointReadError,
        match=f"checkpoint checkpoints/{newest} of .* is damaged .*; nothing in the workdir was "
        f"changed; the newest readable earlier checkpoint is step {previous}: rerun with "
        f"--checkpoint={previous}",
    ):
        load(work, str(newest))
    assert _files(work) == before  # a reader: nothing moved, nothing rewritten
