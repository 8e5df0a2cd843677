"""Conversions between this project's models and other formats (``convert.py``'s library).

* ``interop.bundle``: ``TransformerBundle`` (config + NumPy params + tokenizer), the error type,
  atomic output directories.
* ``interop.workdir_format``: the project's own workdir as a format, read into a bundle and
  written from one (the workdir's files themselves belong to the ``workdirs`` package).
* ``interop.ctranslate2``: writes a CTranslate2 model directory (needs
  ``pip install -e ".[ctranslate2]"``); ``interop.ctranslate2_run`` translates with it as
  ``decode.py`` does, without JAX.
* ``interop.marian``: reads a Hugging Face Marian (OPUS-MT) directory; ``interop.marian_export``
  writes one.
* ``interop.registry``: the ``KIND:PATH`` input and output kinds and ``convert``.
"""

from interop.bundle import ConversionError, TransformerBundle

__all__ = ["ConversionError", "TransformerBundle"]
