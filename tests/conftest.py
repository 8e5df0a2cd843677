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
