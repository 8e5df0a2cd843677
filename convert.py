r"""Converts a model between this project's workdirs and other formats.

    python convert.py --input=workdir:DIR --output=ctranslate2:OUT \
        [--checkpoint=latest|best|averaged|imported|STEP] \
        [--quantization=int8|int8_float32|int8_float16|int8_bfloat16|int16|float16|bfloat16] \
        [--force]
    python convert.py --input=marian:HF_DIR --output=workdir:DIR      # import OPUS-MT
    python convert.py --input=workdir:DIR --output=marian:HF_OUT      # export to transformers

Inputs: ``workdir:DIR`` (a ``train.py`` workdir), ``marian:HF_DIR`` (a Hugging Face Marian
directory with ``model.safetensors``; pickled ``pytorch_model.bin`` files are refused).
Outputs: ``ctranslate2:OUT`` (a CTranslate2 model directory; ``pip install -e
".[ctranslate2]"``), ``marian:OUT`` (``MarianMTModel.from_pretrained`` loads it),
``workdir:OUT`` (for decode.py, plots.py and ``train.py --config.init_from``). The output is
written beside OUT and renamed into place when complete; an existing OUT is refused unless
``--force``. Bad input (an unknown kind, a workdir without tokenizer or checkpoint, an option
the output cannot express, a masked LM, a damaged checkpoint named by ``--checkpoint``) is one
error line and exit status 1, with nothing written. A damaged latest checkpoint is skipped for
the newest readable one, with a warning; the input workdir is never changed.
"""

from __future__ import annotations

import logging

from absl import flags

import cli
from interop.bundle import ConversionError
from interop.registry import convert

log = logging.getLogger("convert")


def main():
    logging.getLogger("jax").setLevel(logging.WARNING)
    f = flags.FLAGS
    path = convert(
        f.input, f.output, force=f.force, checkpoint=f.checkpoint, quantization=f.quantization
    )
    log.info("done: %s", path)


def define_flags() -> None:
    """Command-line flags; defined on demand so that importing this module defines none."""
    flags.DEFINE_string("input", None, "KIND:PATH to read; kinds: workdir, marian.", required=True)
    flags.DEFINE_string(
        "output", None, "KIND:PATH to write; kinds: ctranslate2, marian, workdir.", required=True
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "workdir input: latest (default), best, averaged, imported (a workdir convert.py wrote) "
        "or a step number.",
    )
    flags.DEFINE_string(
        "quantization", None, "ctranslate2 output: weight type (default float32), e.g. int8."
    )
    flags.DEFINE_bool("force", False, "Replace an existing output.")


if __name__ == "__main__":
    cli.run(main, define_flags, "convert", (ConversionError,))
