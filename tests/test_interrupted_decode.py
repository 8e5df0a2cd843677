"""What a decode killed part-way leaves in its output file: a prefix of the translation."""

import signal
import subprocess
import sys
import time

from tests.conftest import REPO


def test_a_killed_decode_leaves_the_first_lines_of_the_translation(
    tiny_workdir, tiny_corpus, tmp_path
):
    src = tmp_path / "dev.en"
    src.write_text((tiny_corpus / "dev.en").read_text(encoding="utf-8"), encoding="utf-8")
    command = [sys.executable, "decode.py", f"--workdir={tiny_workdir}", f"--input={src}",
               "--method=greedy", "--chunk_lines=8"]  # fmt: skip
    full = tmp_path / "full.es"
    done = subprocess.run(
        [*command, f"--output={full}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = full.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(expected) == 200

    out = tmp_path / "cut.es"
    proc = subprocess.Popen(
        [*command, f"--output={out}"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, "no chunk was written"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    lines = out.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the last piece has no newline: cut off (or empty)
    # Whole chunks are written and flushed in input order, so the file holds the first lines
    # of the full translation; rerunning the command rewrites it from the start.
    assert 8 <= len(complete) < 200
    assert complete == expected[: len(complete)]
    assert expected[len(complete)].startswith(lines[-1])
