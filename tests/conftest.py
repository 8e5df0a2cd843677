"""Test set-up: 8 simulated CPU devices (for mesh tests), small shared fixtures, no skips."""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX initialises its backend; tests that need one device still get device 0.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Many tests train the same tiny model, in this process and in `train.py` subprocesses (which
# inherit the environment): one compilation cache for the session saves most of their
# compile time. It is private to the session, so nothing stale is ever read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="aiayn-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# decode.py's traced searches (decoding.exported), likewise private to the session.
if "AIAYN_EXPORT_CACHE" not in os.environ:
    _exported = tempfile.mkdtemp(prefix="aiayn-test-exported-")
    atexit.register(shutil.rmtree, _exported, ignore_errors=True)
    os.environ["AIAYN_EXPORT_CACHE"] = _exported

# The benchmarks' results files (bench/results.py): a benchmark run by a test writes there, never
# into the repository's bench/results/.
if "AIAYN_BENCH_RESULTS" not in os.environ:
    _results = tempfile.mkdtemp(prefix="aiayn-test-bench-results-")
    atexit.register(shutil.rmtree, _results, ignore_errors=True)
    os.environ["AIAYN_BENCH_RESULTS"] = _results

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from configs.tiny import CORPUS as TINY_CORPUS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turns every skip into a failure: a skipped test proves nothing, so the suite has none.

    A test that cannot run here (a missing package, file or device) must fail and say why,
    not pass silently; `xfail` is not used in this project either.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped tests are not allowed in this suite (zero skips): {reason}"


class SkippedModule(pytest.Item):
    """Stands for a module skipped while collecting: one failing test, so that file fails and
    says why while the rest of the session runs (a failed collection would stop it)."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self):
        raise pytest.fail.Exception(
            f"skipped modules are not allowed in this suite: {self.reason}", pytrace=False
        )

    def reportinfo(self):
        return self.path, None, self.name


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while collecting (e.g. ``pytest.importorskip``)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(collector, pytest.Module):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "passed"
        report.longrepr = None
        report.result = [
            SkippedModule.from_parent(collector, name="collection-skipped", reason=str(reason))
        ]


@pytest.fixture(scope="session")
def tiny_corpus() -> Path:
    """The repository's tiny corpus: ``{train,dev}.{en,es}``, 2,000 + 200 verse pairs."""
    assert (TINY_CORPUS / "train.en").exists(), f"fixture corpus missing: {TINY_CORPUS}"
    return TINY_CORPUS


@pytest.fixture(scope="session")
def tiny_workdir(tiny_corpus, tmp_path_factory) -> Path:
    """A workdir trained for 30 steps with configs/tiny.py (decode and plot tests read it)."""
    import training.loop
    from tests.test_train import QUIET, tiny_config

    path = tmp_path_factory.mktemp("tiny_workdir")
    training.loop.train_and_evaluate(tiny_config(num_train_steps=30, **QUIET), path)
    return path


@pytest.fixture(scope="session")
def tiny_loaded(tiny_workdir):
    """``workdirs.restore.load(tiny_workdir)``: (model, params, tokenizer)."""
    from workdirs.restore import load

    return load(tiny_workdir)


@pytest.fixture(scope="session")
def two_checkpoint_workdir(tiny_workdir, tmp_path_factory) -> Path:
    """``tiny_workdir`` resumed for 2 more steps: at least two training checkpoints (its last
    step and 2 after), whatever configs/tiny.py's checkpoint interval, for tests that damage the
    newest. Tests copy it before changing it."""
    import training.loop
    from tests.test_train import QUIET, tiny_config
    from workdirs import checkpoints

    path = tmp_path_factory.mktemp("two_checkpoints") / "W"
    shutil.copytree(tiny_workdir, path)
    _, last = checkpoints.resolve(path)
    training.loop.train_and_evaluate(tiny_config(num_train_steps=last + 2, **QUIET), path)
    return path
