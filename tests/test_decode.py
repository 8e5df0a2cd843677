"""decode.py: one output line per input line, in order; scores and n-best; clear errors."""

import logging
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import decode
from data import DataError, train_tokenizer
from decoding.translate import SearchConfig, Translator
from interop.workdir import load
from tests.conftest import REPO


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
        list(decode.read_chunks(str(bad), 10))


def test_crlf_and_bom_are_handled(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n\r\nfour".encode())
    assert list(decode.read_chunks(str(path), 2)) == [["one", "two"], ["", "four"]]


def _damage(step_dir):
    for f in (step_dir / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable_one(
    tiny_workdir, tiny_loaded, tmp_path, caplog
):
    from training.checkpoint_checks import CheckpointReadError

    work = tmp_path / "W"
    shutil.copytree(tiny_workdir, work)
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
    _, expected, _ = load(tiny_workdir, str(previous))
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
