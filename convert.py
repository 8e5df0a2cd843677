"""Converts a trained model to another format.

    python convert.py --input=workdir:DIR --output=ctranslate2:OUT \
        [--checkpoint=latest|best|averaged|STEP] \
        [--quantization=int8|int8_float32|int8_float16|int8_bfloat16|int16|float16|bfloat16]
        [--force]

Inputs: ``workdir:DIR`` (a ``train.py`` workdir). Outputs: ``ctranslate2:OUT`` (a CTranslate2
model directory; ``pip install -e ".[ctranslate2]"``). The output is written beside OUT and
renamed into place when complete; an existing OUT is refused unless ``--force``. Bad input (an
unknown kind, a workdir without tokenizer or checkpoint, an option the output cannot express)
is one error line and exit status 1, with nothing written.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from interop.common import ConversionError
from interop.registry import convert

log = logging.getLogger("convert")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    for name in ("absl", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    f = flags.FLAGS
    try:
        path = convert(
            f.input, f.output, force=f.force, checkpoint=f.checkpoint, quantization=f.quantization
        )
    except ConversionError as err:
        log.error("%s", str(err).replace("\n", " "))
        sys.exit(1)
    log.info("done: %s", path)


def define_flags() -> None:
    """Command-line flags; defined on demand so that importing this module defines none."""
    flags.DEFINE_string("input", None, "KIND:PATH to read; kinds: workdir.", required=True)
    flags.DEFINE_string("output", None, "KIND:PATH to write; kinds: ctranslate2.", required=True)
    flags.DEFINE_string(
        "checkpoint", None, "workdir input: latest (default), best, averaged or a step number."
    )
    flags.DEFINE_string(
        "quantization", None, "ctranslate2 output: weight type (default float32), e.g. int8."
    )
    flags.DEFINE_bool("force", False, "Replace an existing output.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
