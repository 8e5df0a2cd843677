"""dtype="auto": bf16 where the hardware has bf16 matmul units, kept by a resumed workdir."""

import json
import logging

import jax
import numpy as np
import pytest

import training.loop
from runtime import hardware
from tests.test_train import QUIET, tiny_config
from training import resume
from training.state import model_config


def machine_choosing(dtype: str):
    """A stand-in for ``hardware.resolve_dtype`` on a machine where "auto" means ``dtype``."""
    return lambda requested: (dtype, "this machine") if requested == "auto" else (requested, "")


@pytest.mark.parametrize(
    "backend, flags, expected",
    [
        ("gpu", frozenset(), "bfloat16"),
        ("tpu", frozenset(), "bfloat16"),
        ("cpu", frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}), "bfloat16"),  # AMX
        ("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}), "bfloat16"),  # Zen 4
        ("cpu", frozenset({"avx2", "fma"}), "float32"),  # AVX2 only: bf16 would be emulated
        ("cpu", frozenset({"avx2", "avx512f", "amx_tile"}), "float32"),  # AMX without bf16
        ("cpu", frozenset(), "float32"),  # no /proc/cpuinfo (macOS)
        ("metal", frozenset({"amx_bf16"}), "float32"),  # unknown backend: the safe choice
    ],
)
def test_auto_resolves_from_backend_and_cpu_flags(backend, flags, expected):
    dtype, reason = hardware.resolve_dtype("auto", backend=backend, cpu_flags=flags)
    assert dtype == expected
    assert reason.startswith("dtype=auto on")


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_a_concrete_dtype_is_kept_whatever_the_hardware(requested):
    amx = frozenset({"amx_bf16"})
    assert hardware.resolve_dtype(requested, backend="cpu", cpu_flags=amx) == (
        requested,
        "set in the config",
    )


AMX = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
NO_AMX = frozenset({"avx512f", "avx512_bf16"})


@pytest.mark.parametrize(
    "requested, trained, backend, flags, expected",
    [
        ("auto", "bfloat16", "cpu", NO_AMX, "float32"),  # bf16 is slower there
        ("auto", "bfloat16", "cpu", frozenset(), "float32"),
        ("auto", "bfloat16", "cpu", AMX, "bfloat16"),  # AMX: the training dtype is faster
        ("auto", "float32", "cpu", AMX, "float32"),  # never below the training precision
        ("auto", "float16", "cpu", AMX, "float32"),  # float16 matmuls are emulated on CPUs
        ("auto", "bfloat16", "gpu", NO_AMX, "bfloat16"),
        ("auto", "float32", "tpu", AMX, "float32"),
        ("bfloat16", "float32", "cpu", NO_AMX, "bfloat16"),  # asked for: kept
        ("float32", "bfloat16", "cpu", AMX, "float32"),
        ("float32", "bfloat16", "gpu", NO_AMX, "float32"),
    ],
)
def test_decode_dtype(requested, trained, backend, flags, expected):
    chosen, reason = hardware.resolve_decode_dtype(
        requested, trained, backend=backend, cpu_flags=flags
    )
    assert chosen == expected
    if requested == "auto" and backend == "cpu" and trained == "bfloat16":
        assert ("with amx_bf16" in reason) == (flags is AMX), reason


@pytest.mark.parametrize("here, process0", [(AMX, NO_AMX), (NO_AMX, AMX), (AMX, AMX)])
def test_all_processes_decode_in_process_0_s_dtype(monkeypatch, here, process0):
    from jax.experimental import multihost_utils

    sent = []

    def broadcast(x):  # what process 0, with its own CPU, would have sent
        sent.append(int(x))
        return np.int32("amx_bf16" in process0)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    chosen, reason = hardware.resolve_decode_dtype(
        "auto", "bfloat16", backend="cpu", cpu_flags=here
    )
    assert sent == [int("amx_bf16" in here)]
    assert chosen == ("bfloat16" if process0 is AMX else "float32")
    assert ("process 0 chose" in reason) == (here is not process0)


def test_cpu_info_reads_model_name_and_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n"
    )
    name, flags = hardware.cpu_info(cpuinfo)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "amx_bf16", "amx_tile"} <= flags and "avx512_bf16" not in flags
    assert hardware.cpu_info(tmp_path / "missing") == ("unknown", frozenset())


def test_auto_keeps_the_dtype_an_existing_workdir_was_started_with(tmp_path, monkeypatch):
    # This "machine" has bf16 units; the workdir was started on one without.
    monkeypatch.setattr(hardware, "resolve_dtype", machine_choosing("bfloat16"))
    cfg = tiny_config()
    cfg.model.overrides.dtype = "auto"
    assert resume.resolve_config(cfg, tmp_path).model.overrides.dtype == "bfloat16"  # a new one
    (tmp_path / "model_config.json").write_text(json.dumps({"d_model": 32, "dtype": "float32"}))
    assert resume.resolve_config(cfg, tmp_path).model.overrides.dtype == "float32"
    dtype, reason = hardware.resolve_workdir_dtype("auto", saved="float32")
    assert dtype == "float32" and "keeping its dtype float32" in reason
    # An explicit dtype is the user's choice (check_model_config then refuses a mismatch).
    cfg.model.overrides.dtype = "float16"
    assert resume.resolve_config(cfg, tmp_path).model.overrides.dtype == "float16"


def test_resolve_config_copies_and_model_config_takes_auto():
    cfg = tiny_config()
    cfg.model.overrides.dtype = "auto"
    resolved = resume.resolve_config(cfg)
    expected, _ = hardware.resolve_dtype("auto")
    assert resolved.model.overrides.dtype == expected
    assert cfg.model.overrides.dtype == "auto"  # the caller's config is left as it was
    # Library callers that skip train.py (benchmarks, notebooks) get the same choice.
    assert model_config(cfg, 100).dtype == expected


def test_a_resumed_run_keeps_its_dtype_on_another_machine(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="train")
    first, _ = hardware.resolve_dtype("auto")
    other = "float32" if first == "bfloat16" else "bfloat16"
    cfg = tiny_config(num_train_steps=2, checkpoint_every_steps=2, **QUIET)
    cfg.model.overrides.dtype = "auto"
    training.loop.train_and_evaluate(cfg, tmp_path)
    assert json.loads((tmp_path / "model_config.json").read_text())["dtype"] == first
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["overrides"]["dtype"] == first  # the resolved value, not "auto"

    # "Another machine": the hardware now says otherwise; the workdir's dtype wins.
    monkeypatch.setattr(hardware, "resolve_dtype", machine_choosing(other))
    cfg.num_train_steps = 4
    training.loop.train_and_evaluate(
        cfg, tmp_path
    )  # a different dtype would be refused as a new model
    assert json.loads((tmp_path / "model_config.json").read_text())["dtype"] == first
    assert f"keeping its dtype {first}" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]

    # Fine-tuning from it starts a new workdir: "auto" resolves there from the hardware.
    tuned = tmp_path / "tuned"
    cfg = tiny_config(num_train_steps=1, init_from=str(tmp_path), **QUIET)
    cfg.model.overrides.dtype = "auto"
    training.loop.train_and_evaluate(cfg, tuned)
    assert json.loads((tuned / "model_config.json").read_text())["dtype"] == other
