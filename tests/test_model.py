"""Behaviour of the Transformer modules: the paper's architecture, masks, packing, the cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import Transformer, TransformerConfig, attention_maps, shift_right
from model.attention import einsum_attention, fused_attention
from model.layers import sinusoidal_positions
from model.tricks import softmax_attention
from tests import reference_numpy

VOCAB = 50


def _setup(rng_seed=0, **overrides):
    cfg = TransformerConfig.tiny(VOCAB, **overrides)
    model = Transformer(cfg)
    rng = np.random.default_rng(rng_seed)
    src = jnp.asarray(rng.integers(3, VOCAB, (2, 7)), jnp.int32)
    tgt = jnp.asarray(rng.integers(3, VOCAB, (2, 5)), jnp.int32)
    variables = nn.unbox(model.init(jax.random.key(rng_seed), src, tgt))
    return cfg, model, variables, src, tgt


def _closed_form_params(v, d, f, n_enc, n_dec):
    attention = 4 * d * d  # W^Q, W^K, W^V, W^O; no biases
    ffn = d * f + f + f * d + d
    norm = 2 * d
    encoder = n_enc * (attention + ffn + 2 * norm)
    decoder = n_dec * (2 * attention + ffn + 3 * norm)
    return v * d + encoder + decoder  # one embedding shared by source, target and output


@pytest.mark.parametrize(
    "preset, expected_millions", [("base", 63.0), ("big", 214.2)], ids=["base", "big"]
)
def test_parameter_count_matches_closed_form(preset, expected_millions):
    cfg = getattr(TransformerConfig, preset)(vocab_size=37000)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), ids, ids)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert count == _closed_form_params(
        37000, cfg.d_model, cfg.d_ff, cfg.num_encoder_layers, cfg.num_decoder_layers
    )
    assert count / 1e6 == pytest.approx(expected_millions, abs=0.1)


def test_presets_follow_table_3():
    base, big = TransformerConfig.base(100), TransformerConfig.big(100)
    assert (base.d_model, base.d_ff, base.num_heads, base.dropout_rate) == (512, 2048, 8, 0.1)
    assert (big.d_model, big.d_ff, big.num_heads, big.dropout_rate) == (1024, 4096, 16, 0.3)
    assert base.num_encoder_layers == base.num_decoder_layers == 6 == big.num_decoder_layers
    assert base.head_dim == big.head_dim == 64


def test_positional_encoding_is_the_papers_formula():
    pe = sinusoidal_positions(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert pe[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_positional_encoding_tensor2tensor_layout():
    pe = sinusoidal_positions(20, 8, "concat")
    inv = np.exp(np.arange(4) * -(math.log(1e4) / 3))  # t2t: timescales 1 .. 1e4 over D/2 - 1
    np.testing.assert_allclose(pe[:, :4], np.sin(np.arange(20)[:, None] * inv), atol=1e-6)
    np.testing.assert_allclose(pe[:, 4:], np.cos(np.arange(20)[:, None] * inv), atol=1e-6)


def test_matches_independent_numpy_implementation_of_the_paper():
    cfg, model, variables, src, tgt = _setup()
    logits = model.apply(variables, src, tgt)
    params = jax.device_get(variables["params"])
    layers = (cfg.num_encoder_layers, cfg.num_decoder_layers)
    for b in range(src.shape[0]):
        ref = reference_numpy.transformer(params, np.asarray(src[b]), np.asarray(tgt[b]), layers)
        np.testing.assert_allclose(logits[b], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_does_not_change_real_positions(norm):
    _, model, variables, src, tgt = _setup(norm=norm)
    logits = model.apply(variables, src, tgt)
    padded = model.apply(variables, jnp.pad(src, ((0, 0), (0, 4))), jnp.pad(tgt, ((0, 0), (0, 3))))
    np.testing.assert_allclose(padded[:, : tgt.shape[1]], logits, atol=1e-5)
    # A padded second source gives the same logits as that sentence alone without padding.
    short = src.at[1, 4:].set(0)
    a = model.apply(variables, short, tgt)[1]
    b = model.apply(variables, short[1:, :4], tgt[1:])[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_future_target_tokens_cannot_change_earlier_logits():
    _, model, variables, src, tgt = _setup()
    logits = model.apply(variables, src, tgt)
    for t in range(tgt.shape[1]):
        changed = tgt.at[:, t].set(jnp.where(tgt[:, t] == VOCAB - 1, 3, tgt[:, t] + 1))
        other = model.apply(variables, src, changed)
        np.testing.assert_allclose(other[:, :t], logits[:, :t], atol=1e-6)
        assert not np.allclose(other[:, t:], logits[:, t:], atol=1e-4)


def test_two_packed_examples_equal_each_alone():
    _, model, variables, _, _ = _setup()
    src_a, tgt_a = jnp.array([[5, 6, 7]]), jnp.array([[2, 9, 10, 11]])
    src_b, tgt_b = jnp.array([[12, 13, 14, 15]]), jnp.array([[2, 16, 17]])
    alone_a = model.apply(variables, src_a, tgt_a)
    alone_b = model.apply(variables, src_b, tgt_b)
    packed = model.apply(
        variables,
        jnp.array([[5, 6, 7, 12, 13, 14, 15, 0]]),
        jnp.array([[2, 9, 10, 11, 2, 16, 17, 0]]),
        src_segments=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]),
        tgt_segments=jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]]),
        src_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
        tgt_positions=jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
    )
    np.testing.assert_allclose(packed[:, :4], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:7], alone_b, atol=1e-5)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cached_step_by_step_equals_full_forward(norm):
    _, model, variables, src, tgt = _setup(norm=norm)
    src = src.at[1, 5:].set(0)  # a padded source must be masked in the cached path too
    full = model.apply(variables, src, tgt)
    memory = model.apply(variables, src, method=Transformer.encode)
    cache = model.apply(variables, memory, src, 8, method=Transformer.init_cache)

    def step(ids, c):
        return model.apply(variables, ids, c, method=Transformer.decode_step)

    for t in range(tgt.shape[1]):
        logits, cache = step(tgt[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache["index"]) == tgt.shape[1]
    # A two-token step (prompt prefill) lands in the same place.
    cache = model.apply(variables, memory, src, 8, method=Transformer.init_cache)
    logits, cache = step(tgt[:, :2], cache)
    np.testing.assert_allclose(logits, full[:, :2], atol=1e-5)


def test_bf16_compute_with_float32_params_stays_close():
    _, model, variables, src, tgt = _setup()
    f32 = model.apply(variables, src, tgt)
    cfg16 = model.config.replace(dtype="bfloat16")
    bf16 = Transformer(cfg16).apply(variables, src, tgt)
    assert bf16.dtype == jnp.float32  # logits are accumulated in float32
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()
    assert np.mean(np.argmax(bf16, -1) == np.argmax(f32, -1)) >= 0.9


def test_dropout_is_active_only_when_not_deterministic():
    _, model, variables, src, tgt = _setup(attention_dropout_rate=0.1)
    a = model.apply(variables, src, tgt)
    b = model.apply(variables, src, tgt)
    np.testing.assert_array_equal(a, b)
    train = model.apply(
        variables, src, tgt, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(a, train, atol=1e-3)


def test_attention_maps_are_distributions_that_respect_masks():
    cfg, model, variables, src, tgt = _setup()
    src = src.at[0, 5:].set(0)
    maps = attention_maps(model, variables, src, tgt)
    n, b, h, s, t = cfg.num_encoder_layers, 2, cfg.num_heads, src.shape[1], tgt.shape[1]
    assert maps["encoder_self"].shape == (n, b, h, s, s)
    assert maps["decoder_self"].shape == (cfg.num_decoder_layers, b, h, t, t)
    assert maps["decoder_cross"].shape == (cfg.num_decoder_layers, b, h, t, s)
    np.testing.assert_allclose(maps["decoder_cross"].sum(-1), 1.0, atol=1e-5)
    assert np.all(maps["decoder_cross"][:, 0, :, :, 5:] == 0)  # source padding
    assert np.all(np.triu(maps["decoder_self"], k=1) == 0)  # the future
    # The weights path (einsum) and the fast path give the same logits.
    np.testing.assert_allclose(
        model.apply(variables, src, tgt, mutable="intermediates")[0],
        model.apply(variables, src, tgt),
        atol=1e-5,
    )


def test_einsum_attention_equals_jax_dot_product_attention():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 1, 5, 5)) > 0.3).at[:, :, :, 0].set(True)
    out, probs = einsum_attention(q, k, v, mask)
    np.testing.assert_allclose(out, fused_attention(q, k, v, mask), atol=1e-6)
    assert np.all(np.where(mask, True, probs == 0))


def _attention_grads(attend, q, k, v, mask, cotangent):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, mask).astype(jnp.float32) * cotangent)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_softmax_attention_gradients_equal_autodiff_of_einsum_attention():
    """The hand-written backward pass, in float32, with a causal mask, padding and a query row
    whose keys are all masked (its uniform weights still pass gradient to the values): a case
    the whole-model test (tests/test_reference_mode.py) cannot reach, since no loss reads such
    a row."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 1, 6, 6)) > 0.3) & jnp.tril(jnp.ones((6, 6), bool))
    mask = mask.at[0, :, 2, :].set(False)
    cotangent = jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32)
    np.testing.assert_allclose(
        softmax_attention(q, k, v, mask), einsum_attention(q, k, v, mask)[0], atol=1e-6
    )
    ours = _attention_grads(softmax_attention, q, k, v, mask, cotangent)
    autodiff = _attention_grads(lambda *a: einsum_attention(*a)[0], q, k, v, mask, cotangent)
    for got, want in zip(ours, autodiff, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(jnp.max(jnp.abs(ours[2][0]))) > 0  # the values get gradient from every row


def test_shift_right_puts_bos_at_every_segment_start():
    targets = jnp.array([[7, 8, 1, 9, 1, 0], [4, 5, 6, 1, 0, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(
        shift_right(targets, 2, segments), [[2, 7, 8, 2, 9, 0], [2, 4, 5, 6, 0, 0]]
    )
    np.testing.assert_array_equal(shift_right(targets[1:], 2), [[2, 4, 5, 6, 0, 0]])


def test_overlong_sequence_is_an_error():
    _, model, variables, src, _ = _setup(max_positions=16)
    with pytest.raises(ValueError, match="length 17 exceeds TransformerConfig.max_positions=16"):
        model.apply(variables, src, jnp.ones((2, 17), jnp.int32))
