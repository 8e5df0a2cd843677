"""bench/results.py: a benchmark's latest result names its machine, commit, date and command,
and replaces the previous one whole or not at all."""

import os
import re
import subprocess

import pytest

from bench import results
from runtime.hardware import cpu_info
from tests.conftest import REPO

TABLE = "| what | result |\n|---|---|\n| speed | 12,345 tokens/s |"


def test_the_result_names_machine_commit_date_command_and_holds_the_table(tmp_path):
    path = results.write_result(
        "train_speed", TABLE, argv=["--repeats", "9", "--dtypes", "a b"], directory=tmp_path
    )
    assert path == tmp_path / "train_speed.md"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "# `bench.train_speed`: the latest result"
    assert len([line for line in lines if line.startswith("#")]) == 1  # one heading
    name, flags = cpu_info()
    machine = next(line for line in lines if line.startswith("- machine: "))
    assert name in machine and f"{os.cpu_count()} cores" in machine
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"):
        assert f"{flag} {'yes' if flag in flags else 'no'}" in machine
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert re.search(rf"^- commit: {head}(\+dirty)?$", text, re.M), text
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M), text
    assert "- command: `python -m bench.train_speed --repeats 9 --dtypes 'a b'`" in lines
    assert text.endswith(TABLE + "\n")


def test_the_command_defaults_to_the_process_arguments(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/x/bench/mfu.py", "--preset", "big"])
    text = results.write_result("mfu", TABLE, argv=None, directory=tmp_path).read_text()
    assert "- command: `python -m bench.mfu --preset big`" in text


def test_a_failed_write_leaves_the_previous_result_whole_and_no_temporary_file(
    tmp_path, monkeypatch
):
    old = results.write_result("decode_speed", TABLE, argv=[], directory=tmp_path).read_text()

    def fail(src, dst):
        assert os.path.exists(src) and os.path.dirname(src) == str(tmp_path)  # written beside
        assert "| 99 |" in open(src).read()  # the whole new text, before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        results.write_result("decode_speed", "| 99 |", argv=[], directory=tmp_path)
    assert (tmp_path / "decode_speed.md").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode_speed.md"]


def test_the_next_run_replaces_the_result(tmp_path):
    results.write_result("decode_speed", "| 1 |", argv=[], directory=tmp_path)
    results.write_result("decode_speed", "| 2 |", argv=[], directory=tmp_path)
    text = (tmp_path / "decode_speed.md").read_text()
    assert "| 2 |" in text and "| 1 |" not in text


def test_a_name_that_is_not_a_benchmark_module_is_refused(tmp_path):
    with pytest.raises(ValueError, match="benchmark name"):
        results.write_result("../README", TABLE, argv=[], directory=tmp_path)


def test_the_tests_write_results_outside_the_repository():
    assert results.results_dir() != results.RESULTS  # tests/conftest.py sets the variable


def test_a_changed_tracked_file_marks_the_commit_dirty_but_a_result_file_does_not(tmp_path):
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    (repo / "bench" / "results").mkdir(parents=True)
    plain.mkdir()

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    git("init", "-q")
    (repo / "a.py").write_text("1\n")
    (repo / "bench" / "results" / "x.md").write_text("old\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    assert re.fullmatch(r"[0-9a-f]{7,}", results.commit(repo))
    (repo / "bench" / "results" / "x.md").write_text("new\n")  # a benchmark's last result
    (repo / "notes.txt").write_text("untracked\n")
    assert re.fullmatch(r"[0-9a-f]{7,}", results.commit(repo))
    (repo / "a.py").write_text("2\n")
    assert re.fullmatch(r"[0-9a-f]{7,}\+dirty", results.commit(repo))
    assert results.commit(plain).startswith("unknown")
