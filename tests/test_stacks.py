"""scan_layers and remat change how the layers are compiled, never what the model computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import Transformer, TransformerConfig, attention_maps, make_mesh, use_mesh
from model.embedding import token_losses
from model.sharding import batch_sharding, logical_to_sharding

CFG = TransformerConfig.tiny(64, num_encoder_layers=3, num_decoder_layers=2, max_positions=32)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    src = jnp.asarray(rng.integers(1, 64, (4, 12)), jnp.int32).at[1, 7:].set(0)
    tgt = jnp.asarray(rng.integers(1, 64, (4, 10)), jnp.int32).at[2, 5:].set(0)
    return src, tgt


def stack_layers(params: dict, prefix: str, count: int) -> dict:
    """Unrolled params ``prefix_0..`` -> the scanned layout ``prefix`` with a leading [N]."""
    layers = [params.pop(f"{prefix}_{i}") for i in range(count)]
    params[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


@pytest.fixture(scope="module")
def unrolled():
    src, tgt = batch()
    params = nn.unbox(Transformer(CFG).init(jax.random.key(0), src, tgt))["params"]
    return params


def scanned_params(params):
    out = dict(params)
    out = stack_layers(out, "encoder_layers", CFG.num_encoder_layers)
    return stack_layers(out, "decoder_layers", CFG.num_decoder_layers)


def test_scanned_layers_compute_the_unrolled_model(unrolled):
    src, tgt = batch()
    scan_model = Transformer(CFG.replace(scan_layers=True))
    params = scanned_params(unrolled)
    # The scanned model's own initialisation has exactly this layout.
    init = nn.unbox(jax.eval_shape(scan_model.init, jax.random.key(0), src, tgt))["params"]
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(lambda x: x.shape, params)
    expected = Transformer(CFG).apply({"params": unrolled}, src, tgt)
    got = scan_model.apply({"params": params}, src, tgt)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # Decoding slices the stacked layers: step-by-step logits equal the full pass.
    memory = scan_model.apply({"params": params}, src, method=Transformer.encode)
    cache = scan_model.apply({"params": params}, memory, src, 16, method=Transformer.init_cache)
    for t in range(tgt.shape[1]):
        logits, cache = scan_model.apply(
            {"params": params}, tgt[:, t : t + 1], cache, method=Transformer.decode_step
        )
        valid = np.asarray(tgt[:, t] != 0)
        np.testing.assert_allclose(logits[valid, 0], expected[valid, t], atol=2e-5)
    maps = attention_maps(scan_model, {"params": params}, src, tgt)
    assert maps["encoder_self"].shape == (3, 4, CFG.num_heads, 12, 12)
    assert maps["decoder_cross"].shape == (2, 4, CFG.num_heads, 10, 12)


def loss_and_grads(cfg, params):
    src, tgt = batch(1)
    model = Transformer(cfg)

    def loss(p):
        logits = model.apply(
            {"params": p}, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(3)}
        )
        smoothed, _ = token_losses(logits, jnp.roll(tgt, -1, axis=1), 0.1)
        return jnp.sum(smoothed * (tgt != 0))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def without_remat(unrolled):
    """Loss and gradients of the plain model, with dropout and without: what both remat
    settings must give (computed once for both)."""
    return loss_and_grads(CFG, unrolled), loss_and_grads(CFG.replace(dropout_rate=0.0), unrolled)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_loss_and_gradients(unrolled, without_remat, remat):
    (base_loss, base_grads), (ref_loss, ref_grads) = without_remat
    loss, grads = loss_and_grads(CFG.replace(remat=remat), unrolled)  # dropout masks included
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, base_grads)
    # With scan too: the same numbers once dropout is off.
    scan_cfg = CFG.replace(remat=remat, scan_layers=True, dropout_rate=0.0)
    loss, grads = loss_and_grads(scan_cfg, scanned_params(unrolled))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat = scanned_params(dict(ref_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, flat)


def test_scanned_parameters_shard_over_a_mesh():
    cfg = CFG.replace(scan_layers=True, remat="dots")
    model = Transformer(cfg)
    src, tgt = batch()
    boxed = model.init(jax.random.key(0), src, tgt)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = logical_to_sharding(boxed, mesh)
    query = shardings["params"]["encoder_layers"]["self_attention"]["query"]
    assert query.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # [N,D,H,K]
    variables = jax.device_put(nn.unbox(boxed), shardings)
    expected = model.apply(nn.unbox(boxed), src, tgt)
    with use_mesh(mesh):
        logits = jax.jit(model.apply)(
            variables, *(jax.device_put(x, batch_sharding(mesh)) for x in (src, tgt))
        )
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


def test_a_bad_remat_value_names_the_field():
    with pytest.raises(ValueError, match="remat must be 'none', 'dots' or 'full', got 'some'"):
        CFG.replace(remat="some")
