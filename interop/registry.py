"""The kinds of model ``convert.py`` reads (``--input=KIND:PATH``) and writes (``--output=``).

Each kind names the options it takes; an option given for a conversion whose kinds do not take
it is refused before anything is read. A writer's ``check`` runs first too (does the output
exist, is the option value valid), so bad input fails in a moment with one line. To add a kind,
add an entry to ``READERS`` or ``WRITERS``; import its module inside the functions, so that an
optional dependency is only needed by the conversions that use it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interop.bundle import ConversionError, TransformerBundle


@dataclasses.dataclass(frozen=True)
class Reader:
    """An input kind: ``read(path, **options) -> TransformerBundle``."""

    help: str
    options: tuple[str, ...]
    read: Callable[..., TransformerBundle]
    # The model's architecture read cheaply before ``read`` (None: unknown, ``read`` will say).
    architecture: Callable[[str], str | None] = lambda path: None


@dataclasses.dataclass(frozen=True)
class Writer:
    """An output kind: ``check(path, force, **options)`` before reading the input (raises
    ConversionError), then ``write(bundle, path, force, **options) -> Path``."""

    help: str
    options: tuple[str, ...]
    check: Callable[..., None]
    write: Callable[..., Path]


def _ctranslate2():
    try:
        from interop import ctranslate2
    except ImportError as err:
        if err.name is None or not err.name.startswith("ctranslate2"):
            raise
        raise ConversionError(
            "--output=ctranslate2: needs the ctranslate2 package: pip install -e '.[ctranslate2]'"
        ) from None
    return ctranslate2


def _read_workdir(path: str, checkpoint: str | None = None) -> TransformerBundle:
    from interop.workdir_format import read_workdir

    return read_workdir(path, checkpoint)


def _workdir_architecture(path: str) -> str | None:
    """A workdir's architecture from its ``model_config.json`` (no model is built)."""
    from workdirs.files import saved_model_field

    return saved_model_field(path, "architecture")  # None: read_workdir names what is wrong


def _marian(module: str = "marian"):
    """``interop.marian`` (the reader) or ``interop.marian_export`` (the writer)."""
    try:
        import safetensors  # noqa: F401

        return importlib.import_module(f"interop.{module}")
    except ImportError as err:
        raise ConversionError(f"marian: needs the {err.name} package: pip install -e .") from None


def _workdir():
    from interop import workdir_format

    return workdir_format


READERS: dict[str, Reader] = {
    "workdir": Reader(
        help="a train.py workdir (model_config.json, tokenizer.model, checkpoints)",
        options=("checkpoint",),
        read=_read_workdir,
        architecture=_workdir_architecture,
    ),
    "marian": Reader(
        help="a Hugging Face Marian (OPUS-MT) directory: config.json, model.safetensors, "
        "source.spm, target.spm, vocab.json",
        options=(),
        read=lambda path: _marian().read(path),
    ),
}

WRITERS: dict[str, Writer] = {
    "ctranslate2": Writer(
        help="a CTranslate2 model directory",
        options=("quantization",),
        check=lambda path, force, **o: _ctranslate2().check_output(path, force, **o),
        write=lambda bundle, path, force, **o: _ctranslate2().export(
            bundle, path, force=force, **o
        ),
    ),
    "marian": Writer(
        help="a Hugging Face Marian directory (MarianMTModel / MarianTokenizer.from_pretrained)",
        options=(),
        check=lambda path, force: _marian("marian_export").check_output(path, force),
        write=lambda bundle, path, force: _marian("marian_export").write(bundle, path, force=force),
    ),
    "workdir": Writer(
        help="a workdir for decode.py, plots.py and train.py --config.init_from",
        options=(),
        check=lambda path, force: _workdir().check_output(path, force),
        write=lambda bundle, path, force: _workdir().write_workdir(bundle, path, force=force),
    ),
}


def parse_location(value: str, kinds: dict[str, Any], flag: str) -> tuple[str, str]:
    """Splits ``KIND:PATH``; raises ConversionError for a missing or unknown kind or path."""
    kind, sep, path = (value or "").partition(":")
    known = ", ".join(f"{k}:" for k in kinds)
    if not sep or kind not in kinds:
        raise ConversionError(f"{flag}={value}: expected KIND:PATH with KIND one of {known}")
    if not path:
        raise ConversionError(f"{flag}={value}: the path after {kind}: is empty")
    return kind, path


def convert(input: str, output: str, *, force: bool = False, **options: Any) -> Path:
    """Reads ``input`` (``KIND:PATH``) and writes ``output`` (``KIND:PATH``).

    Args:
      input: e.g. ``workdir:runs/default``.
      output: e.g. ``ctranslate2:runs/default-ct2``.
      force: replace an existing output.
      **options: conversion options; None means not given (``checkpoint``, ``quantization``).

    Returns:
      The written path.

    Raises:
      ConversionError: unknown kinds, options the kinds do not take, bad values, an existing
        output without ``force``, an unreadable input or a model the output cannot represent.
    """
    in_kind, in_path = parse_location(input, READERS, "--input")
    out_kind, out_path = parse_location(output, WRITERS, "--output")
    reader, writer = READERS[in_kind], WRITERS[out_kind]
    source, target = Path(in_path).resolve(), Path(out_path).resolve()
    if target == source or target in source.parents:
        raise ConversionError(f"--output={output} would replace the input {in_path}")
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in reader.options and name not in writer.options:
            raise ConversionError(
                f"--{name} does not apply to --input={in_kind}: or --output={out_kind}: "
                f"(they take: {', '.join(f'--{o}' for o in reader.options + writer.options)})"
            )
    writer_options = {k: v for k, v in given.items() if k in writer.options}
    writer.check(out_path, force, **writer_options)
    _check_architecture(reader.architecture(in_path), in_path, out_kind)  # before reading
    bundle = reader.read(in_path, **{k: v for k, v in given.items() if k in reader.options})
    _check_architecture(bundle.config.architecture, in_path, out_kind)
    return writer.write(bundle, out_path, force, **writer_options)


def _check_architecture(kind: str | None, in_path: str, out_kind: str) -> None:
    """Refuses a model the output kind cannot take (None: not known yet)."""
    if kind == "encoder_only":
        why = (
            "a workdir of one is copied as a directory"
            if out_kind == "workdir"
            else "that kind holds translation (encoder-decoder) models only"
        )
        raise ConversionError(
            f"{in_path} holds an encoder-only (masked LM) model: masked LMs cannot be exported "
            f"to --output={out_kind}: ({why})"
        )
    if kind is not None and out_kind != "workdir" and kind != "encoder_decoder":
        raise ConversionError(
            f"--output={out_kind}: takes translation (encoder-decoder) models; {in_path} holds a "
            f"{kind} model"
        )
