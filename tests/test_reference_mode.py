"""The speed tricks (``model.tricks``) change how the model trains, never what it computes.

One whole model, its training objective with dropout on, differentiated with the tricks (the
default) and in reference mode (plain autodiff, ``jax.random``): the same loss and gradients,
tightly in float32 and as accurately as autodiff in bf16.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import Transformer, TransformerConfig
from model.embedding import Embed
from model.tricks import in_reference_mode, reference_mode
from training.step import loss_sums

# Attention dropout off: with it on, training attends through einsum_attention, not the
# hand-written softmax_attention. Dropout on: its masks must be drawn the same both ways.
CFG = TransformerConfig.tiny(64, logits_bias=True, dropout_rate=0.2, max_positions=32)
BOS_ID = 2
# The backward passes of model.tricks; the Threefry trick is checked by its absence of
# jax.random's bits.
WRITTEN_OUT = {"_matmul_bwd", "_softmax_attention_bwd", "_output_losses_bwd"}


def packed_batch() -> dict:
    """Four rows of 12: two packed examples in row 0, padding on both sides, and a repeated
    target (the output loss's backward scatter-adds its rows)."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(4, 64, (4, 12)).astype(np.int32)
    targets = rng.integers(4, 64, (4, 12)).astype(np.int32)
    inputs[1, 8:] = 0
    targets[2, 6:] = 0
    targets[3, 0] = targets[0, 0]
    segments = np.ones((4, 12), np.int32)
    segments[0, 6:] = 2
    positions = np.tile(np.arange(12, dtype=np.int32), (4, 1))
    positions[0, 6:] -= 6
    batch = {
        "inputs": inputs,
        "targets": targets,
        "inputs_segmentation": np.where(inputs > 0, segments, 0),
        "targets_segmentation": np.where(targets > 0, segments, 0),
        "inputs_position": positions,
        "targets_position": positions,
    }
    return jax.tree.map(jnp.asarray, batch)


@pytest.fixture(scope="module")
def params():
    batch = packed_batch()
    variables = Transformer(CFG).init(jax.random.key(0), batch["inputs"], batch["targets"])
    params = nn.unbox(variables)["params"]
    bias = params["embed"]["logits_bias"]
    params["embed"]["logits_bias"] = 0.5 * jax.random.normal(jax.random.key(1), bias.shape)
    return params


def objective(dtype: str):
    """The train step's objective (summed smoothed loss, its aux) of the module's batch."""
    model, batch = Transformer(CFG.replace(dtype=dtype)), packed_batch()
    return lambda p: loss_sums(model, p, batch, BOS_ID, 0.1, jax.random.key(5))


def loss_and_grads(dtype: str, params, reference: bool):
    with reference_mode(reference):  # traced (and compiled) inside the block
        return jax.jit(jax.value_and_grad(objective(dtype), has_aux=True))(params)


def test_the_switch_is_scoped_and_off_by_default():
    assert not in_reference_mode()
    with reference_mode():
        assert in_reference_mode()
        with reference_mode(False):
            assert not in_reference_mode()
        assert in_reference_mode()
    assert not in_reference_mode()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_trick_is_on_by_default_and_off_in_reference_mode(params, dtype):
    """Float32 included: the low-precision matmul's backward is taken in every dtype."""

    def traced(reference):
        with reference_mode(reference):
            return str(jax.make_jaxpr(objective(dtype))(params))

    tricks, plain = traced(False), traced(True)
    assert set(re.findall(r"bwd=(\w+)", tricks)) == WRITTEN_OUT
    assert "random_bits" not in tricks  # dropout masks by model.tricks.threefry_bits
    assert "custom_vjp_call" not in plain
    assert "random_bits" in plain


def test_float32_loss_and_every_gradient_equal_reference_mode(params):
    (loss, (nll, n)), grads = loss_and_grads("float32", params, False)
    (ref_loss, (ref_nll, ref_n)), ref_grads = loss_and_grads("float32", params, True)
    assert n == ref_n == 12 + 12 + 6 + 12
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert got.dtype == want.dtype, path
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0, path  # every parameter gets a gradient
        np.testing.assert_allclose(got, want, atol=3e-6 * scale, err_msg=str(path))


def test_bf16_gradients_are_as_accurate_as_reference_mode(params):
    """In bf16 the written-out backward passes round to bf16 where mixed precision does; each
    gradient must stay within 1.25x the error of autodiff's (reference mode), both measured
    against float32 reference mode."""
    (exact_loss, _), exact = loss_and_grads("float32", params, True)
    (loss, _), ours = loss_and_grads("bfloat16", params, False)
    (ref_loss, _), autodiff = loss_and_grads("bfloat16", params, True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, exact_loss, rtol=1e-3)

    def errors(grads):
        return jax.tree.map(
            lambda g, e: float(jnp.linalg.norm(g.astype(jnp.float32) - e) / jnp.linalg.norm(e)),
            grads,
            exact,
        )

    for g, e in zip(jax.tree.leaves(ours), jax.tree.leaves(exact), strict=True):
        assert g.dtype == e.dtype == jnp.float32  # float32 parameters, float32 gradients
    for (path, ours_err), autodiff_err in zip(
        jax.tree_util.tree_leaves_with_path(errors(ours)),
        jax.tree.leaves(errors(autodiff)),
        strict=True,
    ):
        assert ours_err < max(1.25 * autodiff_err, 1e-3), (path, ours_err, autodiff_err)


@pytest.mark.parametrize("dtype, atol", [("float32", 3e-6), ("bfloat16", 3e-2)])
def test_the_nll_output_differentiates_as_in_reference_mode(dtype, atol):
    """``Embed.losses``'s second output, the NLL, is a metric: the training objective never
    differentiates it, so the whole-model tests above cannot reach its part of the output
    loss's backward pass. Here both outputs get a cotangent."""
    cfg = TransformerConfig.tiny(40, logits_bias=True, dtype=dtype)
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(2, 5, cfg.d_model)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, 40, (2, 5))).at[1, 4].set(3).at[0, 0].set(3)
    g_smooth, g_nll = (jnp.asarray(rng.normal(size=(2, 5)), jnp.float32) for _ in range(2))
    params = nn.unbox(Embed(cfg).init(jax.random.key(0), targets))["params"]
    params["logits_bias"] = jnp.asarray(rng.normal(size=(40,)), jnp.float32)

    def objective(params, y):
        smoothed, nll = Embed(cfg).apply({"params": params}, y, targets, 0.1, method="losses")
        return jnp.sum(g_smooth * smoothed + g_nll * nll)

    def value_and_grads(reference):
        with reference_mode(reference):
            return jax.value_and_grad(objective, argnums=(0, 1))(params, y)

    (value, grads), (ref_value, ref_grads) = value_and_grads(False), value_and_grads(True)
    np.testing.assert_allclose(value, ref_value, rtol=atol)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, atol=atol * float(jnp.max(jnp.abs(want))))
