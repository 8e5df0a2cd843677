"""The fast dropout draws exactly JAX's own masks, so training results did not change.

The whole model's masks, with the trick and in reference mode, are compared by
``tests/test_reference_mode.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model.dropout import Dropout
from model.tricks import bernoulli, threefry_bits

SHAPES = [(), (1,), (7,), (3, 5, 11), (2, 1, 3), (4, 64, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_threefry_bits_equal_jax_random_bits(shape):
    for seed in range(3):
        key = jax.random.fold_in(jax.random.key(seed), 11)
        ours = jax.jit(threefry_bits, static_argnums=1)(key, shape)
        np.testing.assert_array_equal(ours, jax.random.bits(key, shape, jnp.uint32))
    raw = jax.random.PRNGKey(5)  # a legacy uint32[2] key reads as the default implementation
    np.testing.assert_array_equal(threefry_bits(raw, shape), jax.random.bits(raw, shape))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bernoulli_equals_jax(p):
    key = jax.random.key(3)
    ours = jax.jit(bernoulli, static_argnums=(1, 2))(key, p, (16, 33))
    theirs = jax.random.bernoulli(key, p, (16, 33))
    np.testing.assert_array_equal(ours, theirs)
    assert 0 < ours.sum() < ours.size


def test_other_generators_fall_back_to_jax():
    key = jax.random.key(0, impl="rbg")
    assert threefry_bits(key, (4, 4)) is None
    np.testing.assert_array_equal(
        bernoulli(key, 0.7, (8, 8)), jax.random.bernoulli(key, 0.7, (8, 8))
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_dropout_equals_flax_dropout(dtype, rate):
    x = jax.random.normal(jax.random.key(1), (4, 8, 16)).astype(dtype)
    rngs = {"dropout": jax.random.key(2)}
    ours = Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
    theirs = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(Dropout(rate).apply({}, x, deterministic=True), x)
