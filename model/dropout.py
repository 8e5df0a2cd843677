"""Dropout whose masks are JAX's own Threefry bits, drawn without JAX's slow CPU loop.

``jax.random.bernoulli`` lowers Threefry-2x32 on CPU as a rolled ``while`` loop of 5 iterations,
each reading and writing whole arrays; XLA cannot fuse it, so a step of the probe model
(``bench/train_speed.py``) spent 12% of its time drawing its 17 dropout masks (45 ms of 375 on
a 2-core Intel Xeon with AMX). ``threefry_bits`` writes the same 20 rounds unrolled, as JAX's
GPU/TPU lowering does, so XLA fuses the whole mask into one elementwise pass (22x faster for
those masks, measured). The bits are identical to ``jax.random.bits``, and so are the masks,
the training trajectory and resumed runs; ``tests/test_dropout.py`` pins that.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
    """``jax.random.bits(key, shape, jnp.uint32)``, computed as one fusible expression.

    Args:
      key: a Threefry-2x32 key (``jax.random.key`` or a raw ``uint32[2]``).
      shape: the output shape.

    Returns:
      ``uint32[shape]`` equal to ``jax.random.bits(key, shape)``, or None where that function
      draws its bits differently (another key implementation, ``jax_threefry_partitionable``
      off, or 2^32 elements or more): callers then fall back to ``jax.random``.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key, as jax.random reads it
    if (
        str(jax.random.key_impl(key)) != "threefry2x32"
        or not jax.config.jax_threefry_partitionable
        or math.prod(shape) >= 2**32
    ):
        return None
    k0, k1 = jax.random.key_data(key)
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    # The counter of element i is the 64-bit integer i (its row-major index); built from
    # broadcast iotas rather than a reshaped one so that a sharded shape stays sharded.
    strides = np.cumprod((1, *shape[:0:-1]))[::-1] if shape else ()
    low = sum(
        jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides)
    )
    x0, x1 = ks[0] + jnp.zeros(shape, jnp.uint32), low + ks[1]  # the high word is 0
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0 ^ x1


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, bit for bit, through ``threefry_bits``."""
    # jax.random draws p's dtype (float64 under x64, from 64-bit words): only float32 here.
    bits = threefry_bits(key, shape) if jax.lax.dtype(p) == jnp.float32 else None
    if bits is None:
        return jax.random.bernoulli(key, p, shape)
    # As jax.random.uniform: 23 random mantissa bits under the exponent of 1.0, minus 1.
    one = np.array(1.0, np.float32).view(np.uint32)
    u = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - 1.0
    return u < jnp.float32(p)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (same key, same masks, same outputs) with ``bernoulli`` above.

    Attributes:
      rate: the probability of zeroing an element.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = bernoulli(self.make_rng("dropout"), keep_prob, x.shape)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
