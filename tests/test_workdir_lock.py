"""One process at a time in a workdir (workdirs/lock.py): a second trainer is refused
naming the first, which finishes untouched; a killed holder leaves no stale lock; averaging
checkpoints takes the same lock."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import losses, overrides, start, tiny_config
from training.average import average_checkpoints
from workdirs import lock as workdir_lock


def hold(workdir: Path) -> subprocess.Popen:
    """A process that holds ``workdir``'s lock until killed."""
    code = (
        "import time; from workdirs import lock as workdir_lock; "
        f"lock = workdir_lock.acquire({str(workdir)!r}); print('held', flush=True); "
        "time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_workdir_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirLockError) as info:
            workdir_lock.acquire(tmp_path)
        message = str(info.value)
        assert f"is held by PID {holder.pid} on host {socket.gethostname()}" in message
        assert "use another --workdir" in message and "\n" not in message
        assert workdir_lock.holder(tmp_path)["pid"] == holder.pid  # the refusal wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up
        holder.wait(timeout=60)
    # The kernel released the lock with the process: the next one gets it at once.
    with workdir_lock.acquire(tmp_path, "a test") as lock:
        assert lock.path == tmp_path / ".lock"
        assert workdir_lock.holder(tmp_path)["command"] == "a test"


def test_averaging_is_refused_while_the_workdir_is_held(tiny_workdir, tmp_path):
    workdir = Path(shutil.copytree(tiny_workdir, tmp_path / "workdir"))
    with workdir_lock.acquire(workdir):  # as a training run would
        with pytest.raises(workdir_lock.WorkdirLockError, match="is in use"):
            average_checkpoints(workdir, 2)
    assert not (workdir / "averaged").exists()


def test_a_second_trainer_is_refused_and_the_first_finishes_untouched(tmp_path):
    # The reported case: the same command again with another lr_scale, while the first trains.
    flags = overrides(
        num_train_steps=80, checkpoint_every_steps=20, log_every_steps=10,
        eval_every_steps=0, bleu_every_steps=0, eval_at_end=False,
    )  # fmt: skip
    first = start(tmp_path, flags)
    deadline = time.monotonic() + 240
    while workdir_lock.holder(tmp_path).get("pid") != first.pid:  # it holds the workdir
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the first run never locked its workdir"
        time.sleep(0.05)
    second = start(tmp_path, [*flags, "--config.lr_scale=0.5"])
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 1, out[-3000:]
    [line] = [x for x in out.splitlines() if x.strip()]  # one line, nothing held back before
    assert f"is held by PID {first.pid} on host {socket.gethostname()}" in line, line
    assert first.poll() is None, "the first run ended before the second was refused"

    out, _ = first.communicate(timeout=400)
    assert first.returncode == 0, out[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(10, 81, 10))  # each step once: no second writer
    assert sorted(losses(tmp_path)) == steps
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lr_scale"] == tiny_config().lr_scale != 0.5  # the first run's
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["40", "60", "80"]
