"""What a decode stopped part-way leaves: the old output byte for byte, never a cut one.

The translation goes to a hidden ``.NAME.XXXXXXXX.partial`` file beside the output, renamed
over it only when complete. SIGTERM (like Ctrl-C) removes the partial file; SIGKILL cannot be
caught, so it leaves the partial file, holding the first lines of the translation in order.
"""

import signal
import subprocess
import sys
import time

from tests.conftest import REPO


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_lines(proc: subprocess.Popen, directory, lines: int) -> None:
    """Until the partial file beside the output holds ``lines`` complete lines."""
    deadline = time.monotonic() + 300
    while True:
        partial = sorted(directory.glob(".out.es.*.partial"))
        if partial and partial[0].read_bytes().count(b"\n") >= lines:
            return
        assert proc.poll() is None, f"exited {proc.returncode} first: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no chunk was written"
        time.sleep(0.001)


def test_a_stopped_decode_leaves_the_old_output_unchanged(tiny_workdir, tiny_corpus, tmp_path):
    src = tmp_path / "dev.en"
    src.write_text((tiny_corpus / "dev.en").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out.es"
    command = [sys.executable, "decode.py", f"--workdir={tiny_workdir}", f"--input={src}",
               f"--output={out}", "--method=greedy", "--chunk_lines=8"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    old = out.read_bytes()  # the whole translation: the output the next runs must not harm
    expected = old.decode("utf-8").split("\n")[:-1]
    assert len(expected) == 200
    assert list(tmp_path.glob(".*.partial")) == []

    # SIGKILL: the old output stays; the partial file holds the first lines, in order.
    proc = start(command)
    wait_for_lines(proc, tmp_path, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert out.read_bytes() == old
    [partial] = tmp_path.glob(".out.es.*.partial")
    lines = partial.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the last piece has no newline: cut off (or empty)
    assert 8 <= len(complete) < 200
    assert complete == expected[: len(complete)]
    assert expected[len(complete)].startswith(lines[-1])
    partial.unlink()

    # SIGTERM: unwinds like Ctrl-C; the partial file is removed, the old output stays.
    proc = start(command)
    wait_for_lines(proc, tmp_path, 8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    errors = [line for line in proc.stderr.read().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith("decode ERROR interrupted"), errors
    assert out.read_bytes() == old
    assert list(tmp_path.glob(".*.partial")) == []
