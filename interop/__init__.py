"""Conversions between this project's models and other formats (``convert.py``'s library).

* ``interop.common``: ``TransformerBundle`` (config + NumPy params + tokenizer), the error type,
  atomic output directories.
* ``interop.workdir``: reads and writes a ``train.py`` workdir (its config files, tokenizer
  and checkpoints; ``build_model``, ``load``), for train.py, decode.py and convert.py.
* ``interop.ctranslate2``: writes a CTranslate2 model directory (needs
  ``pip install -e ".[ctranslate2]"``); ``interop.ctranslate2_run`` translates with it as
  ``decode.py`` does, without JAX.
* ``interop.marian``: reads a Hugging Face Marian (OPUS-MT) directory; ``interop.marian_export``
  writes one.
* ``interop.registry``: the ``KIND:PATH`` input and output kinds and ``convert``.
"""

from interop.common import ConversionError, TransformerBundle

__all__ = ["ConversionError", "TransformerBundle"]
