"""The one exception every data module raises for malformed or missing input.

It lives in its own module so that any data module (sources, tfds_source, tokenizer, ...) can
raise it without importing another data module, which would create import cycles (sources
imports tfds_source lazily; tfds_source needs the error).
"""

from __future__ import annotations


class DataError(ValueError):
    """Malformed or missing input data; the message names the file, line and expectation."""
