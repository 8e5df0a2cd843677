"""The model on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated CPU devices equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import Transformer, TransformerConfig, make_mesh, use_mesh
from model.sharding import batch_sharding, logical_to_sharding


def test_sharded_forward_equals_single_device():
    assert jax.device_count() == 8, "conftest asks for 8 simulated CPU devices"
    cfg = TransformerConfig.tiny(64, d_ff=64)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(1, 64, (8, 12)), jnp.int32).at[3, 6:].set(0)
    tgt = jnp.asarray(rng.integers(1, 64, (8, 10)), jnp.int32).at[5, 4:].set(0)
    boxed = model.init(jax.random.key(0), src, tgt)
    variables = nn.unbox(boxed)
    expected = model.apply(variables, src, tgt)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = logical_to_sharding(boxed, mesh)
    sharded_vars = jax.device_put(variables, shardings)
    # Parameters really are split: the embedding [vocab, embed] over tensor x fsdp.
    emb = sharded_vars["params"]["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (32, 16)
    src_s, tgt_s = (jax.device_put(x, batch_sharding(mesh)) for x in (src, tgt))
    with use_mesh(mesh):
        logits = jax.jit(model.apply)(sharded_vars, src_s, tgt_s)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize(
    "sizes, message",
    [((3, 1, 1), "needs 3 devices, but 8"), ((-1, 3, 1), "fsdp=3 x tensor=1 does not divide")],
)
def test_mesh_sizes_are_checked(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(*sizes)
