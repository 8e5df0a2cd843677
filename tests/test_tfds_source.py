"""Tests for `data.tfds_source.TFDSPairs` on a tiny TFDS dataset prepared here, without TF.

The dataset is built from `fixtures/tiny_translate.tsv` by a local `GeneratorBasedBuilder` as
ArrayRecord, which TFDS 4.9 can write without TensorFlow, and with downloads never attempted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import array_record  # noqa: F401  (TFDS's storage format here; a test dependency)
import pytest
import tensorflow_datasets as tfds

from data import tfds_source  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.tfds_source import TFDSPairs, TFDSUnavailableError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_translate.tsv"
NAME = "aiayn_tiny_translate"


def _read_fixture() -> dict[str, list[tuple[str, str]]]:
    """The fixture's (de, en) pairs: 'train' before the blank line, 'validation' after."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    split = "train"
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        if not line:
            split = "validation"
            continue
        de, en = line.split("\t")
        splits[split].append((de, en))
    return splits


PAIRS = _read_fixture()


class AiaynTinyTranslate(tfds.core.GeneratorBasedBuilder):
    """WMT-shaped toy dataset: Translation features {'de', 'en'}, kept in file order."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.Translation(languages=("de", "en")),
            supervised_keys=("de", "en"),
            # Keep generation order so the test can check order exactly.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in PAIRS}

    def _generate_examples(self, split):
        for i, (de, en) in enumerate(PAIRS[split]):
            yield i, {"de": de, "en": en}


def _prepare(data_dir: Path) -> Path:
    builder = AiaynTinyTranslate(data_dir=str(data_dir))
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("tfds"))


def test_en_de_length_order_and_text(data_dir):
    src = TFDSPairs(NAME, "train", data_dir=data_dir, source_lang="en", target_lang="de")
    assert len(src) == 5
    assert [src[i] for i in range(len(src))] == [(en, de) for de, en in PAIRS["train"]]
    assert all(isinstance(s, str) and isinstance(t, str) for s, t in src)
    assert src.languages == ("de", "en")
    assert "en->de" in repr(src)


def test_de_en_direction_and_splits(data_dir):
    src = TFDSPairs(NAME, "validation", data_dir=data_dir, source_lang="de", target_lang="en")
    assert list(src) == PAIRS["validation"]
    head = TFDSPairs(NAME, "train[:2]", data_dir=data_dir, source_lang="de", target_lang="en")
    assert list(head) == PAIRS["train"][:2]


def test_sequence_protocol(data_dir):
    src = TFDSPairs(NAME, "train", data_dir=data_dir, source_lang="en", target_lang="de")
    want = [(en, de) for de, en in PAIRS["train"]]
    assert src[-1] == want[-1]
    with pytest.raises(IndexError):
        src[len(src)]
    assert src.__getitems__([3, 0]) == [want[3], want[0]]
    # grain's multiprocessing workers get the source pickled.
    assert list(pickle.loads(pickle.dumps(src))) == want


def test_grain_reads_it(data_dir):
    import grain

    src = TFDSPairs(NAME, "train", data_dir=data_dir, source_lang="en", target_lang="de")
    assert list(grain.MapDataset.source(src)) == [(en, de) for de, en in PAIRS["train"]]


def test_bad_language_lists_available(data_dir):
    with pytest.raises(DataError, match=r"target_lang='fr'.*available: de, en"):
        TFDSPairs(NAME, "train", data_dir=data_dir, source_lang="en", target_lang="fr")
    with pytest.raises(DataError, match="both 'en'"):
        TFDSPairs(NAME, "train", data_dir=data_dir, source_lang="en", target_lang="en")


def test_unknown_split_names_the_splits(data_dir):
    with pytest.raises(ValueError, match="train"):
        TFDSPairs(NAME, "test", data_dir=data_dir)


def test_unknown_dataset_is_unavailable(tmp_path):
    with pytest.raises(TFDSUnavailableError, match="no_such_dataset_xyz"):
        TFDSPairs("no_such_dataset_xyz", "train", data_dir=tmp_path)


def test_wmt_languages_validated_before_data(tmp_path):
    # The builder's features are known without its data: a bad language is reported first.
    with pytest.raises(DataError, match="available: de, en"):
        TFDSPairs("wmt14_translate/de-en", "train", data_dir=tmp_path, source_lang="fr")


def test_tfrecord_only_data_is_refused_then_rebuilt(data_dir, tmp_path, monkeypatch):
    # TFRecord cannot be written without TF; relabel a prepared copy's format instead.
    copy = tmp_path / "tfr"
    shutil.copytree(data_dir, copy)
    info = next(copy.glob(f"{NAME}/*/dataset_info.json"))
    meta = json.loads(info.read_text())
    meta["fileFormat"] = "tfrecord"
    info.write_text(json.dumps(meta))
    with pytest.raises(TFDSUnavailableError, match="(?s)stored as tfrecord.*--rebuild"):
        TFDSPairs(NAME, "train", data_dir=copy)
    monkeypatch.setattr(tfds_source, "_require_prepare_deps", lambda name: None)
    tfds_source.main([NAME, "--data_dir", str(copy), "--rebuild"])
    assert list(TFDSPairs(NAME, "validation", copy, "de", "en")) == PAIRS["validation"]


def test_download_prepares_as_array_record(tmp_path, monkeypatch):
    # This builder needs neither network nor TF: skip both checks, keep the preparation itself.
    monkeypatch.setattr(tfds_source, "_check_network", lambda name: None)
    monkeypatch.setattr(tfds_source, "_require_prepare_deps", lambda name: None)
    src = TFDSPairs(NAME, "train", tmp_path, source_lang="de", target_lang="en", download=True)
    assert list(src) == PAIRS["train"]
    assert list(tmp_path.glob(f"{NAME}/*/*.array_record-*"))
    # Prepared already: a second `prepare` neither probes the network nor needs TF.
    monkeypatch.setattr(tfds_source, "_check_network", None)
    monkeypatch.setattr(tfds_source, "_require_prepare_deps", None)
    assert tfds_source.prepare(NAME, tmp_path).endswith("1.0.0")


def test_download_without_tensorflow_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "_check_network", lambda name: None)
    # A machine without TensorFlow, whether or not this one has it.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tfds_source.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a),
    )
    with pytest.raises(TFDSUnavailableError, match="pip install tensorflow-cpu"):
        TFDSPairs("wmt14_translate/de-en", "train", data_dir=tmp_path, download=True)


def test_tensorflow_gpus_hidden(monkeypatch):
    calls = []
    fake_tf = types.SimpleNamespace(
        config=types.SimpleNamespace(set_visible_devices=lambda d, kind: calls.append((d, kind)))
    )
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    monkeypatch.setattr(tfds_source, "_tf_hidden", None)
    tfds_source._hide_gpus_from_tensorflow()
    tfds_source._hide_gpus_from_tensorflow()  # Once only: TF refuses after initialising.
    assert calls == [([], "GPU")]


def _run(code: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `code` in a fresh interpreter (a hang fails the test instead of blocking it)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def test_absent_wmt_fails_fast_without_download(tmp_path):
    proc, seconds = _run(
        f"""
        from data.tfds_source import TFDSPairs, TFDSUnavailableError
        try:
            TFDSPairs('wmt14_translate/de-en', 'train', data_dir={str(tmp_path)!r})
        except TFDSUnavailableError as e:
            print('ERROR', e)
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("ERROR"), out
    for needed in (
        "wmt14_translate/de-en",
        str(tmp_path),
        f"python -m data.tfds_source wmt14_translate/de-en --data_dir {tmp_path}\n",
        "tfds build",
    ):
        assert needed in out
    assert "tensorflow-cpu" in out and "download=True" in out
    assert seconds < 20


def test_offline_download_fails_fast(tmp_path):
    # '.invalid' never resolves (RFC 6761): the probe fails as on a machine with no network.
    proc, seconds = _run(
        f"""
        from data import tfds_source
        tfds_source._PROBE_ADDRESS = ('tfds-probe.invalid', 80)
        try:
            tfds_source.TFDSPairs('wmt14_translate/de-en', data_dir={str(tmp_path)!r},
                                  download=True)
        except tfds_source.TFDSUnavailableError as e:
            print('ERROR', e)
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERROR") and "unreachable" in proc.stdout, proc.stdout
    assert seconds < 20


def test_fresh_process_reads_without_builder_code_or_tf(data_dir):
    # Training processes never import the builder class: TFDS reads the prepared files alone.
    proc, _ = _run(
        f"""
        import sys
        from data.tfds_source import TFDSPairs
        src = TFDSPairs({NAME!r}, 'train', data_dir={str(data_dir)!r})
        print(len(src), src[0][0], 'tensorflow' in sys.modules)
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == f"5 {PAIRS['train'][0][1]} False"
