"""Translation pairs from a TFDS dataset (`wmt14_translate/de-en`, ...), random access, no TF.

`TFDSPairs` follows grain's `RandomAccessDataSource` protocol: `len(src)` and
`src[i] -> (source, target)` strings. The direction is picked by language code from the dataset's
features (WMT's are `{'de': Text, 'en': Text}`, so en->de is `source_lang='en', target_lang='de'`).

Storage. Reads go through TFDS's random-access data sources (`builder.as_data_source`, the same
path as `tfds.data_source`), which need the data prepared as ArrayRecord (or Parquet) but never
TensorFlow. Data prepared in TFDS's default TFRecord format is refused with an error that says
how to rebuild it: a sequential fallback would need TensorFlow at training time and would hold a
multi-GB corpus in memory.

Preparing. With `download=False` (the default) absent data fails at once with
`TFDSUnavailableError`, naming the data dir and the command that prepares it:

    python -m data.tfds_source wmt14_translate/de-en --data_dir DIR [--rebuild]

`download=True` does the same from Python. Both check connectivity with a short timeout before
handing over to TFDS (whose downloader retries and can hang offline), and need TensorFlow, which
TFDS uses to extract the WMT archives, and importlib_resources, which tensorflow-datasets 4.9
uses without declaring it (`pip install tensorflow-cpu importlib_resources`: the `tf` extra).
The `tfds build` CLI of tensorflow-datasets 4.9.10 also works but needs apache-beam on top.

GPUs. Whenever TensorFlow is imported on this path (preparing, or TFDS importing it itself),
its GPUs are hidden with `tf.config.set_visible_devices([], 'GPU')` before it initialises them,
so it never grabs the accelerator memory that JAX needs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from data.errors import DataError

log = logging.getLogger(__name__)

# Connectivity probe before a download: every WMT builder fetches from statmt.org (over http).
# Resolution and connection both run under `_PROBE_TIMEOUT_S` (DNS lookups ignore socket
# timeouts, hence the thread).
_PROBE_ADDRESS = ("www.statmt.org", 80)
_PROBE_TIMEOUT_S = 3.0

# Modules that preparing a dataset needs but reading does not. tensorflow-datasets 4.9 imports
# importlib_resources in `DatasetBuilder.code_path` without declaring it for Python >= 3.9.
_PREPARE_DEPS = ("tensorflow", "importlib_resources")

# The TensorFlow module whose GPUs `_hide_gpus_from_tensorflow` has hidden.
_tf_hidden: Any = None

Pair = tuple[str, str]


class TFDSUnavailableError(DataError, RuntimeError):
    """The TFDS dataset cannot be read: not prepared, no network, or a missing package.

    A `DataError` (so the pipeline reports it like any other bad input) and a `RuntimeError`.
    """


def prepare(name: str, data_dir: str | os.PathLike | None = None, *, rebuild: bool = False) -> str:
    """Downloads and prepares a TFDS dataset as ArrayRecord, unless it is readable already.

    A prepared copy without random access (TFRecord) is replaced: TFDS cannot add a format to
    it in place.

    Args:
        name: TFDS name with config, e.g. 'wmt14_translate/de-en'.
        data_dir: TFDS data dir; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.
        rebuild: Replace even a readable prepared copy; the downloaded files in
            DATA_DIR/downloads are reused when present.

    Returns:
        The dataset's version directory.

    Raises:
        TFDSUnavailableError: No network, or TensorFlow / importlib_resources missing.
    """
    tfds = _import_tfds()
    root = _root(data_dir)
    builder = _builder(tfds, name, root)
    if builder.is_prepared() and not rebuild and _random_access(tfds, builder):
        return os.fspath(builder.data_dir)
    if not rebuild:  # A rebuild normally finds its downloads cached under DATA_DIR/downloads.
        _check_network(name)
    _require_prepare_deps(name)
    if builder.is_prepared():
        # TFDS cannot change a prepared copy's file format in place, so replace the copy.
        if isinstance(builder, tfds.core.read_only_builder.ReadOnlyBuilder):
            raise TFDSUnavailableError(
                f"cannot rebuild {name!r}: no TFDS builder code for it, only its prepared data"
            )
        log.info("removing the prepared copy in %s to rebuild it", builder.data_dir)
        shutil.rmtree(builder.data_dir)
        builder = _builder(tfds, name, root)
    log.info("preparing TFDS dataset %s as array_record under %s", name, root)
    builder.download_and_prepare(
        file_format="array_record",
        # Skip TFDS's look-up of a pre-built copy on GCS: those are TFRecord, unusable here.
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return os.fspath(builder.data_dir)


class TFDSPairs:
    """`(source, target)` string pairs of one split of a TFDS translation dataset.

    Attributes:
        name: The TFDS name, e.g. 'wmt14_translate/de-en'.
        split: The TFDS split, e.g. 'train', 'validation' or 'train[:1000]'.
        source_lang: Feature key of the source side.
        target_lang: Feature key of the target side.
        languages: The dataset's language codes (its text feature keys), sorted.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        source_lang: str = "en",
        target_lang: str = "de",
        download: bool = False,
    ):
        """Opens the split, preparing the dataset first if `download` and it is absent.

        Args:
            name: TFDS name with config (and optional version), e.g. 'wmt14_translate/de-en'.
            split: TFDS split spec, slicing included ('train[:10%]').
            data_dir: TFDS data dir; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.
            source_lang: Language code (feature key) to read as the source.
            target_lang: Language code (feature key) to read as the target.
            download: Download and prepare the dataset (as ArrayRecord) if it is absent.

        Raises:
            TFDSUnavailableError: The data is absent (or TFRecord-only) and cannot be prepared
                here: download is off, there is no network or TensorFlow is missing.
            DataError: The languages are not the dataset's, or the name/config is invalid.
            ValueError: Unknown split (from TFDS; the message lists the splits).
        """
        if not name or not isinstance(name, str):
            raise DataError(
                f"a TFDS dataset name is needed (e.g. 'wmt14_translate/de-en'), got {name!r}"
            )
        self.name, self.split = name, split
        self.source_lang, self.target_lang = source_lang, target_lang
        tfds = _import_tfds()
        root = _root(data_dir)
        builder = _builder(tfds, name, root)
        # Features are known from the builder code alone, so bad languages fail before data.
        self.languages = _text_languages(tfds, name, builder.info.features)
        for role, lang in (("source", source_lang), ("target", target_lang)):
            if lang not in self.languages:
                raise DataError(
                    f"{role}_lang={lang!r} is not a language of TFDS dataset {name!r}; "
                    f"available: {', '.join(self.languages)}"
                )
        if source_lang == target_lang:
            raise DataError(f"source_lang and target_lang are both {source_lang!r}")

        if not builder.is_prepared():
            if not download:
                raise TFDSUnavailableError(
                    f"TFDS dataset {name!r} is not prepared under data_dir {root!r} (looked in "
                    f"{os.fspath(builder.data_dir)!r}) and download=False. "
                    + _prepare_hint(name, root)
                )
            prepare(name, root)
            builder = _builder(tfds, name, root)  # Re-read the dataset_info just written.
        if not _random_access(tfds, builder):
            formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
            raise TFDSUnavailableError(
                f"TFDS dataset {name!r} under {os.fspath(builder.data_dir)!r} is stored as "
                f"{formats}, which has no random access without TensorFlow. "
                + _prepare_hint(name, root, rebuild=True)
            )
        self._source = builder.as_data_source(split=split)
        _hide_gpus_from_tensorflow()

    def __len__(self) -> int:
        return len(self._source)

    def _pair(self, example: dict[str, Any]) -> Pair:
        return _text(example[self.source_lang]), _text(example[self.target_lang])

    def __getitem__(self, index: int) -> Pair:
        # ArrayRecord rejects negative keys and raises ValueError past the end; a sequence
        # counts from the end and raises IndexError (which also ends `iter` / `list`).
        n = len(self._source)
        i = index.__index__()
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} pairs")
        return self._pair(self._source[i % n])

    def __iter__(self) -> Iterator[Pair]:
        return (self[i] for i in range(len(self)))

    def __getitems__(self, indices: Sequence[int]) -> list[Pair]:
        """Batched read (ArrayRecord reads several records in one call)."""
        return [self._pair(example) for example in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return (
            f"TFDSPairs({self.name!r}, split={self.split!r}, "
            f"{self.source_lang}->{self.target_lang}, len={len(self)})"
        )


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise TFDSUnavailableError(
            f"TFDS sources need tensorflow-datasets and array_record ({e}); install them with "
            "`pip install -e '.[tfds]'`"
        ) from e
    # The legacy translation builders (wmt14_translate, ...) register themselves on import, and
    # tfds imports its dataset packages lazily, so without this `tfds.builder` does not find them.
    importlib.import_module("tensorflow_datasets.translate")
    return tfds


def _root(data_dir: str | os.PathLike | None) -> str:
    if data_dir is None:
        # Read TFDS_DATA_DIR now: tfds's own DATA_DIR constant froze it at import.
        from tensorflow_datasets.core import constants

        data_dir = constants.get_default_data_dir()
    return os.path.expanduser(os.fspath(data_dir))


def _builder(tfds: Any, name: str, root: str) -> Any:
    """The registered builder, or one read from a prepared copy under `root` (no code needed)."""
    try:
        return tfds.builder(name, data_dir=root)
    except tfds.core.DatasetNotFoundError as e:
        raise TFDSUnavailableError(
            f"{name!r} is neither a TFDS dataset known to this tensorflow-datasets version nor "
            f"prepared under data_dir {root!r}. " + _prepare_hint(name, root)
        ) from e
    except ValueError as e:  # Unknown config or version: TFDS's message lists the valid ones.
        raise DataError(f"bad TFDS dataset name {name!r}: {e}") from e
    finally:
        _hide_gpus_from_tensorflow()


def _random_access(tfds: Any, builder: Any) -> bool:
    formats = builder.info.available_file_formats()
    return bool(formats & tfds.core.file_adapters.FileFormat.with_random_access())


def _prepare_hint(name: str, root: str, rebuild: bool = False) -> str:
    return (
        "Prepare it as array_record with network access, TensorFlow and importlib_resources "
        "(`pip install tensorflow-cpu importlib_resources`: only preparing needs them; the WMT "
        "builders extract their archives with TensorFlow):\n"
        f"  python -m data.tfds_source {name} --data_dir {root}{' --rebuild' if rebuild else ''}\n"
        f"or tfds build {name} --data_dir={root} --file_format=array_record"
        f"{' --overwrite' if rebuild else ''} (the tfds CLI also needs apache-beam)"
        + ("" if rebuild else ", or pass download=True (data.download=True in a config).")
    )


def _hide_gpus_from_tensorflow() -> None:
    """Hides the GPUs from TensorFlow if it has been imported, so it never allocates on them."""
    global _tf_hidden
    tf = sys.modules.get("tensorflow")
    # Once per TF module: after TF initialises its devices, asking again raises.
    if tf is None or _tf_hidden is tf:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
        _tf_hidden = tf
    except RuntimeError as e:  # TF already initialised its devices: too late to hide them.
        log.warning("could not hide GPUs from TensorFlow (already initialised): %s", e)


def _check_network(name: str) -> None:
    """Raises `TFDSUnavailableError` unless the download host answers within a few seconds."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection(_PROBE_ADDRESS, timeout=_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S + 0.5)
    if outcome and outcome[0] is None:
        return
    why = outcome[0] if outcome else f"no answer within {_PROBE_TIMEOUT_S:g} s"
    host, port = _PROBE_ADDRESS
    raise TFDSUnavailableError(
        f"cannot download TFDS dataset {name!r}: {host}:{port} is unreachable ({why}). Prepare "
        "it on a machine with network access and copy its data dir here."
    )


def _require_prepare_deps(name: str) -> None:
    """Imports what preparing needs beyond reading (TensorFlow, hiding its GPUs), or says how."""
    missing = [m for m in _PREPARE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise TFDSUnavailableError(
            f"preparing TFDS dataset {name!r} needs {' and '.join(missing)} (TFDS extracts the "
            "downloaded archives with TensorFlow, and looks up its builders' checksum files "
            "with importlib_resources): `pip install tensorflow-cpu importlib_resources`, or "
            "`pip install -e '.[tf]'`. Reading the prepared data afterwards needs neither."
        )
    importlib.import_module("tensorflow")
    _hide_gpus_from_tensorflow()


def _text_languages(tfds: Any, name: str, features: Any) -> tuple[str, ...]:
    """The keys of the dataset's text features: its language codes."""
    items = features.items() if hasattr(features, "items") else ()
    languages = tuple(sorted(k for k, f in items if isinstance(f, tfds.features.Text)))
    if len(languages) < 2:
        raise DataError(
            f"TFDS dataset {name!r} is not a translation dataset with one text feature per "
            f"language: features are {features}"
        )
    return languages


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m data.tfds_source NAME [--data_dir DIR] [--rebuild]`: prepares a dataset."""
    parser = argparse.ArgumentParser(
        prog="python -m data.tfds_source",
        description="Download and prepare a TFDS translation dataset as array_record.",
    )
    parser.add_argument("name", help="TFDS name with config, e.g. wmt14_translate/de-en")
    parser.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/...")
    parser.add_argument(
        "--rebuild", action="store_true", help="regenerate an existing (e.g. TFRecord) copy"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        version_dir = prepare(args.name, args.data_dir, rebuild=args.rebuild)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"prepared {args.name} as array_record in {version_dir}")


if __name__ == "__main__":
    main()
