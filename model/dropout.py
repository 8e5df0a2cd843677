"""Dropout whose masks are JAX's own Threefry bits, drawn by ``model.tricks.bernoulli``.

The masks, and so the training trajectory and resumed runs, are those of
``flax.linen.Dropout`` bit for bit (``tests/test_dropout.py``); only the drawing is faster, and
reference mode (``model.tricks.reference_mode``) draws them with ``jax.random`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.tricks import bernoulli


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (same key, same masks, same outputs) with ``bernoulli``.

    Attributes:
      rate: the probability of zeroing an element.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """``x`` of any shape; each element kept with probability ``1 - rate`` and scaled by
        ``1 / (1 - rate)``, or zeroed. ``deterministic``: ``x`` unchanged."""
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = bernoulli(self.make_rng("dropout"), keep_prob, x.shape)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
