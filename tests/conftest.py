"""Test set-up: 8 simulated CPU devices (for mesh tests) and small shared fixtures."""

import os

# Must happen before JAX initialises its backend; tests that need one device still get device 0.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus" / "bible-en-es"


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The prebuilt default corpus beside the repository (CI has it); skip where absent."""
    if not (SHARED_CORPUS / "train.en").exists():
        pytest.skip(f"prebuilt corpus not found at {SHARED_CORPUS}")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def tiny_workdir(shared_corpus, tmp_path_factory) -> Path:
    """A workdir trained for 30 steps with configs/tiny.py (decode and plot tests read it)."""
    import train
    from tests.test_train import QUIET, tiny_config

    path = tmp_path_factory.mktemp("tiny_workdir")
    train.train_and_evaluate(tiny_config(shared_corpus, num_train_steps=30, **QUIET), path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_workdir):
    """``decode.load(tiny_workdir)``: (model, params, tokenizer)."""
    import decode

    return decode.load(tiny_workdir)
