"""train.py: metrics, checkpoints, exact resume after SIGTERM and SIGKILL, fallback from a corrupt
checkpoint, non-finite losses, several meshes, several processes, checkpoint averaging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import training.loop
import training.step
from configs.tiny import get_config
from model import Transformer, TransformerConfig, build_model, make_mesh, use_mesh
from model.embedding import token_losses
from tests import multihost_worker
from tests.conftest import REPO
from training.average import average_checkpoints
from training.state import (
    OptimizerConfig,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)
from training.step import jit_train_step, make_train_step, train_batch_sharding
from workdirs import checkpoints


def optimizer_config(**changes) -> OptimizerConfig:
    """The paper's Adam settings with a short warmup, for steps on synthetic batches."""
    values = dict(warmup_steps=10, lr_scale=1.0, adam_b1=0.9, adam_b2=0.98, adam_eps=1e-9)
    return OptimizerConfig(**{**values, "grad_clip_norm": 0.0, **changes})


QUIET = dict(eval_every_steps=0, bleu_every_steps=0, eval_at_end=False, log_every_steps=1)


# configs/tiny.py is sized to learn something visible in a minute; the tests check the machinery
# on a few dozen steps, so they train what it was before: the `tiny` preset's own shape (four
# times cheaper a step), its schedule and its evaluation and checkpoint cadence.
FAST = {
    "model.overrides.d_model": 32, "model.overrides.d_ff": 64, "tokens_per_step": 1024,
    "lr_scale": 2.0, "warmup_steps": 10, "num_train_steps": 40, "log_every_steps": 10,
    "eval_every_steps": 40, "eval_sentences": 16, "num_samples": 2, "checkpoint_every_steps": 20,
}  # fmt: skip
FAST_FLAGS = [f"--config.{k}={v}" for k, v in FAST.items()]


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """configs/tiny.py (on the repository's fixture corpus) as the tests train it (FAST), with
    some fields changed."""
    cfg = get_config()
    for key, value in FAST.items():
        *parents, name = key.split(".")
        node = cfg
        for parent in parents:
            node = node[parent]
        node[name] = value
    cfg.update(changes)
    return cfg


def overrides(**changes) -> list[str]:
    """The same changes as command-line flags for ``train.py --config=configs/tiny.py``."""
    return [f"--config.{k}={v}" for k, v in changes.items()]


def start(workdir: Path, flags: list[str]) -> subprocess.Popen:
    """``train.py --config=configs/tiny.py`` (FAST shape) with ``flags``, in the background."""
    cmd = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
           *FAST_FLAGS, *flags]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def losses(workdir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs some steps twice)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()}"
        path = workdir / "metrics.jsonl"
        if path.exists() and max(losses(workdir) or {0: 0}) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def test_run_writes_metrics_config_tensorboard_and_checkpoints(tmp_path):
    cfg = tiny_config(num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=6)
    last = training.loop.train_and_evaluate(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec",
                "model_flops_per_sec", "elapsed_s"):  # fmt: skip
        assert all(key in r for r in train_rows), key
    assert train_rows[-1]["step"] == 6
    evals = [r for r in rows if "bleu" in r]
    assert evals and {"bleu", "chrf", "bleu_signature"} <= set(evals[-1])
    assert any("dev_loss" in r and "dev_ppl" in r for r in rows)
    assert last["loss"] == train_rows[-1]["loss"]
    schedule = learning_rate_schedule(32, cfg.warmup_steps, cfg.lr_scale)
    row = train_rows[-1]  # the rate that step used: optax counts updates from 0
    assert row["learning_rate"] == pytest.approx(float(schedule(row["step"] - 1)), rel=1e-6)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 6
    model_cfg = json.loads((tmp_path / "model_config.json").read_text())
    assert TransformerConfig.from_dict(model_cfg).d_model == 32
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert (tmp_path / "best").exists()


def test_resume_after_sigterm_and_sigkill_reproduces_losses_bitwise(tmp_path):
    flags = overrides(num_train_steps=40, checkpoint_every_steps=5, **QUIET)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reference = start(straight, flags)

    proc = start(interrupted, flags)
    wait_for_step(proc, interrupted, 7)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stopped_at = max(losses(interrupted))
    assert checkpoints.resolve(interrupted) == ("checkpoints", stopped_at)  # saved on the way out

    proc = start(interrupted, flags)
    wait_for_step(proc, interrupted, stopped_at + 9)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait(timeout=60)
    assert max(losses(interrupted)) < 40, "the run finished before it could be killed"

    proc = start(interrupted, flags)
    assert proc.wait(timeout=240) == 0, proc.stdout.read()
    assert reference.wait(timeout=240) == 0, reference.stdout.read()
    expected, got = losses(straight), losses(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    assert got == expected  # bitwise: same floats, not merely close


def test_corrupt_checkpoint_is_set_aside_and_previous_one_used(tmp_path, caplog):
    cfg = tiny_config(num_train_steps=4, checkpoint_every_steps=2, **QUIET)
    training.loop.train_and_evaluate(cfg, tmp_path)
    # Damage every file of step 4's parameters, as a full disk or a bad copy would.
    for f in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)
    cfg.num_train_steps = 6
    training.loop.train_and_evaluate(cfg, tmp_path)
    assert "checkpoint" in caplog.text and "is damaged" in caplog.text
    assert list((tmp_path / "corrupt_checkpoints").iterdir())[0].name.startswith("4-")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in rows if "loss" in r][4:]
    assert resumed == [3, 4, 5, 6]  # continued from step 2, the last good checkpoint


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch
):
    real = training.step.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, batch, rng, horizon=None):
            new_state, metrics = step(state, batch, rng, horizon)
            bad = jnp.where(state.step >= 4, jnp.nan, metrics["loss"])
            return new_state, {**metrics, "loss": bad}

        return wrapped

    monkeypatch.setattr(training.step, "make_train_step", poisoned)
    cfg = tiny_config(num_train_steps=10, checkpoint_every_steps=2, **QUIET)
    with pytest.raises(training.loop.NonFiniteLossError, match="loss is nan at step 5"):
        training.loop.train_and_evaluate(cfg, tmp_path)
    assert checkpoints.resolve(tmp_path) == ("checkpoints", 4)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only", "encoder_only"])
def test_losses_agree_on_every_mesh_shape(architecture):
    cfg = TransformerConfig.tiny(64, num_heads=8, architecture=architecture)
    model = build_model(cfg)
    tx, schedule = make_optimizer(optimizer_config(grad_clip_norm=1.0), cfg.d_model)
    rng = np.random.default_rng(0)
    batches = [
        {k: rng.integers(1, 64, (2, 8, 16)).astype(np.int32) for k in ("inputs", "targets")}
        for _ in range(2)
    ]
    results = {}
    # Each axis alone for the translation model; the family shares its sharding rules, so the
    # mesh that uses all three axes at once is enough there (each mesh is a compilation).
    shapes = [(8, 1, 1), (2, 2, 2), (1, 1, 8)] if architecture == "encoder_decoder" else [(2, 2, 2)]
    for shape in (None, *shapes):
        mesh = make_mesh(devices=jax.devices()[:1]) if shape is None else make_mesh(*shape)
        shardings, _ = state_shardings(model, tx, mesh)
        state = init_state(model, tx, shardings, jax.random.key(0))
        step = jit_train_step(model, tx, schedule, mesh, shardings, bos_id=2, label_smoothing=0.1)
        out = []
        with use_mesh(mesh):
            for b in batches:
                state, metrics = step(
                    state, jax.device_put(b, train_batch_sharding(mesh)), jax.random.key(1)
                )
                out.append(float(metrics["loss"]))
        results[shape] = out
    for shape, out in results.items():
        np.testing.assert_allclose(out, results[None], rtol=2e-5, err_msg=str(shape))
    assert results[None][1] != results[None][0]  # the first step really changed the model


def test_two_processes_train_together_like_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = str(REPO / "tests" / "multihost_worker.py")
    env = {**os.environ, "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    # One process owning both devices: this one, on two of its simulated devices.
    expected = multihost_worker.losses(make_mesh(devices=jax.devices()[:2]))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        got = json.loads(out.splitlines()[-1])["losses"]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_train_py_runs_on_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = overrides(
        num_train_steps=6, checkpoint_every_steps=3, log_every_steps=2,
        eval_every_steps=0, bleu_every_steps=0, eval_sentences=4, beam_size=1,
    )  # fmt: skip
    distributed = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [start(tmp_path, [*flags, *distributed, f"--process_id={i}"]) for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]  # written once, by process 0
    assert any("bleu" in r for r in rows)  # translation gathers rows from both processes
    assert checkpoints.resolve(tmp_path) == ("checkpoints", 6)
    assert (tmp_path / "checkpoints" / "3").is_dir()


def test_checkpoint_averaging_writes_the_mean(tmp_path):
    cfg = tiny_config(num_train_steps=6, checkpoint_every_steps=2, **QUIET)
    training.loop.train_and_evaluate(cfg, tmp_path)
    step, steps = average_checkpoints(tmp_path, 2)
    assert (step, steps) == (6, [4, 6])
    averaged, meta = checkpoints.load_params(tmp_path, "averaged")
    a, _ = checkpoints.load_params(tmp_path, 4)
    b, _ = checkpoints.load_params(tmp_path, 6)
    expected = jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / 2, a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), averaged, expected)
    assert meta["averaged_steps"] == [4, 6]
    with pytest.raises(FileNotFoundError, match="no checkpoints to average"):
        average_checkpoints(tmp_path / "nothing", 2)


def test_gradient_accumulation_equals_the_whole_batch():
    model = Transformer(TransformerConfig.tiny(64, dropout_rate=0.0))
    tx, schedule = make_optimizer(optimizer_config(), 32)
    mesh = make_mesh(devices=jax.devices()[:1])
    shardings, _ = state_shardings(model, tx, mesh)
    step = jax.jit(make_train_step(model, tx, schedule, bos_id=2, label_smoothing=0.1))
    rng = np.random.default_rng(0)
    whole = {k: rng.integers(1, 64, (1, 8, 12)).astype(np.int32) for k in ("inputs", "targets")}
    whole["targets"][0, :3, 6:] = 0  # unequal token counts per micro-batch
    split = {k: v.reshape(2, 4, 12) for k, v in whole.items()}
    results = []
    for batch in (whole, split):
        state = init_state(model, tx, shardings, jax.random.key(0))
        state, metrics = step(state, batch, jax.random.key(1))
        results.append((state.params, metrics))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    assert m1["target_tokens"] == m2["target_tokens"] == 8 * 12 - 3 * 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p2)


def test_label_smoothing_equals_optax_formulation():
    import optax

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 3)))
    smoothed, nll = token_losses(logits, targets, 0.1)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, 11), 0.1)
    np.testing.assert_allclose(smoothed, optax.softmax_cross_entropy(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(
        nll, optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-5
    )


def test_learning_rate_schedule_is_the_papers():
    schedule = learning_rate_schedule(512, 4000)
    for step in (1, 100, 4000, 10_000):
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert float(schedule(step - 1)) == pytest.approx(expected, rel=1e-5)


def test_cooldown_ramps_the_papers_rate_linearly_to_zero():
    paper = learning_rate_schedule(256, 400, 0.5)
    cooled = learning_rate_schedule(256, 400, 0.5, cooldown_steps=200, total_steps=1000)
    for count in (0, 399, 799):  # before the cooldown: the paper's rate
        assert float(cooled(count)) == pytest.approx(float(paper(count)), rel=1e-6)
    for count in (800, 900, 999):  # update `count` (from 0) is scaled by (1000 - count) / 200
        expected = float(paper(count)) * (1000 - count) / 200
        assert float(cooled(count)) == pytest.approx(expected, rel=1e-5)
    assert float(cooled(1000)) == 0.0
    with pytest.raises(ValueError, match="cooldown_steps=2000"):
        learning_rate_schedule(256, 400, cooldown_steps=2000, total_steps=1000)


def test_a_cooldown_longer_than_the_run_covers_the_whole_run(caplog):
    # A short trial of the default config (cooldown 500) with --config.num_train_steps=30.
    config = optimizer_config(num_train_steps=30, cooldown_steps=500)
    _, schedule = make_optimizer(config, 32)
    paper = learning_rate_schedule(32, config.warmup_steps, config.lr_scale)
    for count in (0, 15, 29):
        assert float(schedule(count)) == pytest.approx(float(paper(count)) * (30 - count) / 30)
    assert "cooling down over the whole run" in caplog.text


def test_any_model_field_can_be_overridden_on_the_command_line():
    import dataclasses

    from absl import flags
    from ml_collections import config_flags

    from training.state import model_config

    argv = [
        "train.py",
        f"--config={REPO / 'configs' / 'default.py'}",
        "--config.model.overrides.dropout_rate=0.25",
        "--config.model.overrides.norm=pre",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    declared = set(values.config.model.overrides)
    assert declared == {f.name for f in dataclasses.fields(TransformerConfig)} - {"vocab_size"}
    cfg = model_config(values.config, 500)
    assert (cfg.dropout_rate, cfg.norm, cfg.d_model, cfg.vocab_size) == (0.25, "pre", 256, 500)
    # Fields left unset keep the preset's value.
    assert cfg.layer_norm_epsilon == TransformerConfig.base(500).layer_norm_epsilon
