"""Resuming a workdir: damaged, mismatched and unreadable checkpoints told apart; fine-tuning;
a kill right after a new best checkpoint; a failed save."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import training.loop
from bench.fault_injection import fail_checkpoint_writes
from model import Transformer, TransformerConfig, make_mesh
from tests.conftest import REPO
from tests.test_train import FAST_FLAGS, losses, tiny_config
from training.state import OptimizerConfig, make_optimizer, state_shardings
from workdirs import checkpoint_errors, checkpoints

# Regular checkpoints at 2 and 4, a best one at 3 (greedy BLEU on 4 dev sentences).
SETTINGS = dict(
    num_train_steps=4, checkpoint_every_steps=2, bleu_every_steps=3, eval_every_steps=0,
    eval_at_end=False, beam_size=1, eval_sentences=4, num_samples=0, log_every_steps=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trained")
    training.loop.train_and_evaluate(tiny_config(**SETTINGS), path)
    return path


@pytest.fixture
def workdir(trained, tmp_path) -> Path:
    """A private copy of the trained workdir."""
    return Path(shutil.copytree(trained, tmp_path / "workdir"))


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time, but the workdir's lock
    file: every run that holds the workdir writes its PID there (workdirs/lock.py)."""
    return {
        str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != ".lock"
    }


def abstract_state(workdir: Path, **changes):
    """The abstract training state configs/tiny.py (with ``changes``) builds for ``workdir``."""
    cfg = tiny_config(**changes)
    model_cfg = TransformerConfig.from_dict(json.loads((workdir / "model_config.json").read_text()))
    tx, _ = make_optimizer(OptimizerConfig.from_config(cfg), model_cfg.d_model)
    _, abstract = state_shardings(Transformer(model_cfg), tx, make_mesh(devices=jax.devices()[:1]))
    return abstract


def meta(workdir: Path, kind: str, step: int) -> dict:
    return json.loads((workdir / kind / str(step) / "meta" / "metadata").read_text())


def test_a_kill_right_after_a_new_best_checkpoint_resumes(trained, workdir, caplog):
    # The state a SIGKILL right after step 3 leaves: best/3 written, checkpoints/4 not yet.
    shutil.rmtree(workdir / "checkpoints" / "4")
    training.loop.train_and_evaluate(tiny_config(**SETTINGS), workdir)
    assert checkpoints.resolve(workdir) == ("checkpoints", 4)
    assert sorted(p.name for p in (workdir / "best").iterdir()) == ["3"]
    # The BLEU of best/3 was learnt from best/, not lost with the regular checkpoint.
    assert meta(workdir, "checkpoints", 4)["best_bleu"] == meta(workdir, "best", 3)["bleu"]
    assert losses(workdir) == losses(trained)  # steps 3 and 4 again, bitwise the same

    # Should a best checkpoint's score be unreadable, its step is still not written twice.
    shutil.rmtree(workdir / "checkpoints" / "4")
    caplog.clear()
    (workdir / "best" / "3" / "meta" / "metadata").write_text("{garbled")
    with caplog.at_level(logging.INFO, logger="train"):
        training.loop.train_and_evaluate(tiny_config(**SETTINGS), workdir)
    assert "cannot read the score of best checkpoint" in caplog.text
    assert "best checkpoint 3 exists already" in caplog.text


def test_a_checkpoint_of_another_optimizer_is_refused_and_nothing_moves(workdir):
    before = snapshot(workdir)
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
        training.loop.train_and_evaluate(tiny_config(**SETTINGS, grad_clip_norm=1.0), workdir)
    message = str(info.value)
    assert f"checkpoint {workdir}/checkpoints/4 does not fit this configuration" in message
    assert "opt_state: " in message and "leaves expected but not saved" in message
    assert "grad_clip_norm: 0.0 -> 1.0" in message and "Nothing was moved" in message
    assert f"--config.init_from={workdir}" in message
    assert snapshot(workdir) == before  # no checkpoint moved, no config rewritten
    assert not (workdir / "corrupt_checkpoints").exists()

    # From the command line: one line naming it, a non-zero exit, nothing touched.
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         *FAST_FLAGS, *(f"--config.{k}={v}" for k, v in SETTINGS.items()),
         "--config.grad_clip_norm=1.0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},  # 8 devices, as the workdir was trained
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "grad_clip_norm: 0.0 -> 1.0" in errors[0], result.stderr[-3000:]
    assert snapshot(workdir) == before


def test_a_workdir_of_another_model_is_refused_and_nothing_moves(workdir):
    before = snapshot(workdir)
    cfg = tiny_config(**SETTINGS)
    cfg.model.overrides.d_ff = 128
    with pytest.raises(ValueError, match=r"describes a different model .*'d_ff': \(64, 128\)"):
        training.loop.train_and_evaluate(cfg, workdir)
    assert snapshot(workdir) == before


def test_a_checkpoint_of_another_batch_layout_is_refused(workdir):
    with pytest.raises(checkpoints.CheckpointMismatchError, match="batches: saved with") as info:
        training.loop.train_and_evaluate(tiny_config(**SETTINGS, tokens_per_step=4096), workdir)
    assert "tokens_per_step: 1024 -> 4096" in str(info.value)


def test_fine_tuning_starts_from_the_parameters_with_a_fresh_optimizer(trained, tmp_path):
    tuned = tmp_path / "tuned"
    # lr 0: the first update leaves the parameters as they came.
    changes = dict(num_train_steps=1, checkpoint_every_steps=1, bleu_every_steps=0,
                   lr_scale=0.0, grad_clip_norm=1.0, init_from=str(trained))  # fmt: skip
    cfg = tiny_config(**{**SETTINGS, **changes})
    training.loop.train_and_evaluate(cfg, tuned)
    params, _ = checkpoints.load_params(tuned, 1)
    source, _ = checkpoints.load_params(trained, 4)
    jax.tree.map(np.testing.assert_array_equal, params, source)
    assert (tuned / "tokenizer.model").read_bytes() == (trained / "tokenizer.model").read_bytes()
    # The new optimizer (with clipping) counted one update: Adam started afresh.
    abstract = abstract_state(tuned, grad_clip_norm=1.0)
    restored = checkpoints.restore_latest(checkpoints.manager(tuned), abstract)
    assert int(jax.tree.leaves(restored[0].opt_state)[0]) == 1  # Adam's count

    with pytest.raises(ValueError, match="own --workdir"):
        training.loop.train_and_evaluate(tiny_config(init_from=str(trained)), trained)
    with pytest.raises(ValueError, match=r"another model .*'d_ff': \(64, 128\)"):
        cfg = tiny_config(init_from=str(trained / "best"))
        cfg.model.overrides.d_ff = 128
        training.loop.train_and_evaluate(cfg, tmp_path / "other")
    with pytest.raises(ValueError, match="expected a training workdir"):
        training.loop.train_and_evaluate(
            tiny_config(init_from=str(tmp_path / "nope")), tmp_path / "x"
        )


def test_transient_read_errors_are_retried_then_fail_loudly(workdir, monkeypatch, caplog):
    monkeypatch.setattr(checkpoints, "RETRY_DELAYS_S", (0.0, 0.0))
    real, calls = ocp.CheckpointManager.restore, []

    def flaky(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) <= failures:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    abstract = abstract_state(workdir)
    failures = 2
    state, _, _ = checkpoints.restore_latest(checkpoints.manager(workdir), abstract)
    assert int(state.step) == 4 and "retrying" in caplog.text

    before, failures, calls = snapshot(workdir), 100, []
    with pytest.raises(checkpoint_errors.CheckpointReadError, match="in 3 tries .*nothing was"):
        checkpoints.restore_latest(checkpoints.manager(workdir), abstract)
    assert calls == [4, 4, 4] and snapshot(workdir) == before


def test_an_unknown_read_error_moves_nothing(workdir, monkeypatch):
    def broken(self, step, *args, **kwargs):
        raise TypeError("something unexpected")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", broken)
    before = snapshot(workdir)
    with pytest.raises(checkpoint_errors.CheckpointReadError, match="not one that damaged"):
        checkpoints.restore_latest(checkpoints.manager(workdir), abstract_state(workdir))
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "damage",
    [
        "truncate params/d",  # the tree of the parameters' arrays
        "garble opt_state/manifest.ocdbt",
        "garble params/ocdbt.process_0/d",  # the arrays themselves
        "garble meta/metadata",
        "remove data",
    ],
)
def test_a_damaged_checkpoint_is_set_aside_for_the_previous_one(workdir, damage, caplog):
    action, where = damage.split(" ")
    target = workdir / "checkpoints" / "4" / where
    files = sorted(f for f in target.rglob("*") if f.is_file()) if target.is_dir() else [target]
    for f in files:
        content = f.read_bytes()
        if action == "truncate":
            f.write_bytes(content[: len(content) // 2])
        elif action == "garble":
            f.write_bytes(bytes(b ^ 0x5A for b in content))
    if action == "remove":
        shutil.rmtree(target)
    state, _, _ = checkpoints.restore_latest(checkpoints.manager(workdir), abstract_state(workdir))
    assert int(state.step) == 2
    assert "checkpoint" in caplog.text and "is damaged" in caplog.text
    [moved] = (workdir / "corrupt_checkpoints").iterdir()
    assert moved.name.startswith("4-") and (moved / where).exists() == (action != "remove")
    assert checkpoints.resolve(workdir) == ("checkpoints", 2)


def test_classify_tells_transient_from_damaged_from_unknown():
    classify = checkpoint_errors.classify
    assert classify(OSError(errno.EIO, "Input/output error")) == "transient"
    assert classify(ValueError("UNAVAILABLE: Error reading local file")) == "transient"
    assert classify(json.JSONDecodeError("Expecting value", "", 0)) == "damaged"
    assert classify(ValueError('DATA_LOSS: Error reading "x" in OCDBT database')) == "damaged"
    wrapped = Exception("Encountered error while reading array index: (slice(0, 4, 1),)")
    assert classify(wrapped) == "damaged"
    try:  # a transient cause wrapped in Orbax's generic error is still transient
        try:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        except OSError as err:
            raise Exception("Encountered error while reading array index") from err
    except Exception as err:
        assert classify(err) == "transient"
    for unknown in (TypeError("x"), ValueError("Tree structures differ"), RuntimeError("?")):
        assert classify(unknown) is None


def test_a_failed_save_leaves_the_previous_checkpoint_valid(trained, tmp_path):
    workdir = tmp_path / "full_disk"
    with fail_checkpoint_writes(step=4), pytest.raises(
        checkpoints.CheckpointWriteError, match=r"No space left on device.*steps \[2\]"
    ):  # fmt: skip
        training.loop.train_and_evaluate(tiny_config(**SETTINGS), workdir)
    assert checkpoints.resolve(workdir) == ("checkpoints", 2)
    assert not (workdir / "checkpoints" / "4").exists()
    training.loop.train_and_evaluate(tiny_config(**SETTINGS), workdir)  # resumes from 2
    assert losses(workdir) == losses(trained)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
