"""The family from the same blocks: old checkpoints unchanged, the decoder-only LM and the
encoder-only masked LM (causality, padding, cache, sharding, parameter counts, masking)."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import decoding
from model import (
    DecoderOnlyLM,
    EncoderOnly,
    Transformer,
    TransformerConfig,
    build_model,
    make_mesh,
    use_mesh,
)
from model.encoder_only import mask_id
from model.sharding import batch_sharding, logical_to_sharding
from training.objectives import mlm_mask

FIXTURES = Path(__file__).parent / "fixtures"
V = 64


def _lm(**overrides):
    cfg = TransformerConfig.tiny(V, architecture="decoder_only", max_positions=32, **overrides)
    model = DecoderOnlyLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, V, (3, 10)), jnp.int32)
    ids = ids.at[:, 0].set(2)
    return model, nn.unbox(model.init(jax.random.key(0), ids)), ids


def _mlm(**overrides):
    cfg = TransformerConfig.tiny(V, architecture="encoder_only", max_positions=32, **overrides)
    model = EncoderOnly(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(4, V, (3, 10)), jnp.int32)
    return model, nn.unbox(model.init(jax.random.key(0), ids)), ids


def test_checkpoint_from_before_the_refactor_loads_with_the_same_logits():
    """A workdir trained by the code before the model package was split into blocks (2 steps,
    configs/tiny.py) loads into today's Transformer and gives the logits it gave then."""
    from workdirs.restore import load

    model, params, _ = load(FIXTURES / "legacy_workdir")
    assert isinstance(model, Transformer)
    src = jnp.array([[5, 17, 42, 99, 1, 0, 0], [7, 8, 9, 10, 11, 12, 1]], jnp.int32)
    tgt = jnp.array([[2, 30, 31, 32, 0], [2, 40, 41, 42, 43]], jnp.int32)
    expected = np.load(FIXTURES / "legacy_workdir_logits.npy", allow_pickle=False)
    np.testing.assert_allclose(model.apply({"params": params}, src, tgt), expected, atol=1e-5)


def test_build_model_picks_the_class_and_configs_check_the_stacks():
    assert isinstance(build_model(TransformerConfig.tiny(V)), Transformer)
    assert isinstance(
        build_model(TransformerConfig.tiny(V, architecture="decoder_only")), DecoderOnlyLM
    )
    cfg = TransformerConfig.tiny(V, architecture="encoder_only")
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 0)
    with pytest.raises(
        ValueError, match="num_encoder_layers must be 0 for architecture='decoder_only'"
    ):
        TransformerConfig(V, architecture="decoder_only")
    with pytest.raises(ValueError, match="num_classes must be 0"):
        TransformerConfig.tiny(V, num_classes=3)
    with pytest.raises(ValueError, match="DecoderOnlyLM needs architecture='decoder_only'"):
        DecoderOnlyLM(TransformerConfig.tiny(V)).init(
            jax.random.key(0), jnp.ones((1, 4), jnp.int32)
        )


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_lm_is_causal(norm):
    model, variables, ids = _lm(norm=norm)
    logits = model.apply(variables, ids)
    changed = model.apply(variables, ids.at[:, 6:].set(ids[:, 6:] % 7 + 10))
    np.testing.assert_allclose(changed[:, :6], logits[:, :6], atol=1e-5)
    assert not np.allclose(changed[:, 6:], logits[:, 6:], atol=1e-3)


def test_lm_and_mlm_ignore_padding():
    for build in (_lm, _mlm):
        model, variables, ids = build()
        logits = model.apply(variables, ids)
        padded = model.apply(variables, jnp.pad(ids, ((0, 0), (0, 5))))
        np.testing.assert_allclose(padded[:, : ids.shape[1]], logits, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lm_cached_decoding_equals_the_full_pass(scan_layers):
    model, variables, ids = _lm(norm="pre", scan_layers=scan_layers)
    full = model.apply(variables, ids)
    cache = model.apply(variables, 3, 16, method=DecoderOnlyLM.init_cache)
    # A 4-token prompt at once, then one token per step.
    logits, cache = model.apply(variables, ids[:, :4], cache, method=DecoderOnlyLM.decode_step)
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-5)
    for t in range(4, ids.shape[1]):
        logits, cache = model.apply(
            variables, ids[:, t : t + 1], cache, method=DecoderOnlyLM.decode_step
        )
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_a_cache_longer_than_the_position_table_is_refused():
    model, variables, _ = _lm()
    with pytest.raises(ValueError, match=r"cache length 33 must be in \[1, 32\]"):
        model.apply(variables, 3, 33, method=DecoderOnlyLM.init_cache)


def test_searches_drive_the_lm_through_tokens_to_logits():
    """Greedy search from a prompt equals feeding back the full pass's argmax; beam search runs
    on the same function and its best hypothesis scores at least greedy's."""
    model, variables, ids = _lm()
    prompts = ids[:, :4]
    fn, cache, first = decoding.lm_decoder(model, variables, prompts, 16)
    out, _ = decoding.greedy_search(fn, cache, batch_size=3, bos_id=first, eos_id=1, max_len=6)
    seq = prompts
    for _ in range(5):
        nxt = jnp.argmax(model.apply(variables, seq)[:, -1].at[:, 0].set(-jnp.inf), axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(jnp.int32)], axis=1)
    # The expected output: the argmax chain up to its first EOS, which the search puts last
    # if the chain has none within max_len.
    for row, chain in zip(np.asarray(out), np.asarray(seq[:, 4:]), strict=True):
        ends = list(chain).index(1) if 1 in chain else 5
        expected = np.zeros(6, np.int32)
        expected[:ends], expected[ends] = chain[:ends], 1
        np.testing.assert_array_equal(row, expected)
    fn, cache, first = decoding.lm_decoder(model, variables, prompts, 16)
    seqs, scores = decoding.beam_search(
        fn, cache, batch_size=3, beam_size=3, alpha=0.0, bos_id=first, eos_id=1, max_len=6
    )
    assert seqs.shape == (3, 1, 6) and np.all(np.isfinite(np.asarray(scores)))


def _closed_form(cfg, *, cross: bool, encoder: bool):
    d, f = cfg.d_model, cfg.d_ff
    attention = 4 * d * d + (3 * d + d if cfg.attention_bias else 0)
    ffn = d * f + f + f * d + d
    norm = 2 * d
    final = norm if cfg.norm == "pre" else 0
    if encoder:
        stack = cfg.num_encoder_layers * (attention + ffn + 2 * norm) + final
        head = d * d + d + norm + (d * cfg.num_classes + cfg.num_classes)
        return cfg.vocab_size * d + stack + head
    layer = (2 if cross else 1) * attention + ffn + (3 if cross else 2) * norm
    return cfg.vocab_size * d + cfg.num_decoder_layers * layer + final


def _count(model, *args):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))


def test_parameter_counts_in_closed_form():
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    gpt2 = TransformerConfig.gpt2_small()
    count = _count(DecoderOnlyLM(gpt2), ids)
    assert count == _closed_form(gpt2, cross=False, encoder=False)
    # GPT-2 small has 124.44M with its learned [1024, 768] position table; ours is sinusoidal.
    assert count == pytest.approx(124_439_808 - 1024 * 768)
    lm = TransformerConfig.tiny(V, architecture="decoder_only", norm="pre", attention_bias=True)
    assert _count(DecoderOnlyLM(lm), ids) == _closed_form(lm, cross=False, encoder=False)
    mlm = TransformerConfig.tiny(V, architecture="encoder_only", num_classes=3)
    assert _count(EncoderOnly(mlm), ids) == _closed_form(mlm, cross=False, encoder=True)


def test_classifier_reads_the_first_token():
    model, variables, ids = _mlm(num_classes=3)
    out = model.apply(variables, ids, method=EncoderOnly.classify)
    assert out.shape == (3, 3) and out.dtype == jnp.float32
    padded = model.apply(variables, jnp.pad(ids, ((0, 0), (0, 4))), method=EncoderOnly.classify)
    np.testing.assert_allclose(padded, out, atol=1e-5)


@pytest.mark.parametrize("build", [_lm, _mlm], ids=["lm", "mlm"])
def test_sharded_equals_unsharded_on_8_devices(build):
    assert jax.device_count() == 8, "conftest asks for 8 simulated CPU devices"
    model, _, ids = build()
    ids = jnp.tile(ids, (3, 1))[:8]
    boxed = model.init(jax.random.key(0), ids)
    variables = nn.unbox(boxed)
    expected = model.apply(variables, ids)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(variables, logical_to_sharding(boxed, mesh))
    assert sharded["params"]["embed"]["embedding"].addressable_shards[0].data.shape == (32, 16)
    with use_mesh(mesh):
        logits = jax.jit(model.apply)(sharded, jax.device_put(ids, batch_sharding(mesh)))
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


def test_mlm_masking_statistics():
    """15% of the regular tokens are chosen; of those 80% masked, 10% random, 10% kept."""
    vocab, first = 1000, 4
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(first, vocab - 1, (256, 512)), jnp.int32)
    ids = ids.at[:, 400:].set(0).at[:, 0].set(2).at[:, 399].set(1)  # padding, BOS, EOS
    inputs, targets = mlm_mask(jax.random.key(0), ids, vocab_size=vocab, first_regular_id=first)
    inputs, targets, ids = (np.asarray(x) for x in (inputs, targets, ids))
    chosen = targets > 0
    regular = ids >= first
    assert not np.any(chosen & ~regular)  # padding, BOS, EOS never chosen
    assert np.array_equal(inputs[~chosen], ids[~chosen])
    assert np.array_equal(targets[chosen], ids[chosen])
    n = chosen.sum()
    assert chosen.sum() / regular.sum() == pytest.approx(0.15, abs=0.003)
    masked = inputs[chosen] == mask_id(vocab)
    kept = inputs[chosen] == ids[chosen]
    random = ~masked & ~kept
    assert masked.mean() == pytest.approx(0.8, abs=0.01)
    # A random replacement equals the original 1 time in ~995: "kept" is 10% plus that.
    assert kept.mean() == pytest.approx(0.1, abs=0.01)
    assert random.mean() == pytest.approx(0.1, abs=0.01)
    replaced = inputs[chosen][random]
    assert replaced.min() >= first and replaced.max() < mask_id(vocab)
    assert n > 10_000
