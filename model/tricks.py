"""The speed tricks, and the one switch that turns them off: reference mode.

Each trick computes what a plain JAX expression computes, faster on the machines this project
trains on (timings: ``bench/HISTORY.md``, "Timings moved from docstrings"):

* ``matmul``: an einsum whose backward pass runs its two matmuls in the compute dtype, as
  mixed precision does, instead of multiplying a float32 cotangent by a bf16 operand.
* ``softmax_attention``: attention with FlashAttention-2's backward pass written out.
* ``output_losses``: the label-smoothed loss of the tied output projection, with a backward
  pass that keeps the vocabulary-sized work to one elementwise pass and two matmuls.
* ``bernoulli``: JAX's own Threefry-2x32 bits (so the same dropout masks, bit for bit) as one
  fusible expression instead of JAX's rolled loop on CPU.

Forward values are the plain expressions' bit for bit (``output_losses``: up to float
rounding), gradients up to float rounding.

Reference mode, ``with reference_mode(): ...``, replaces every trick by its plain form: the
same forward expressions differentiated by JAX's autodiff, and ``jax.random.bernoulli``. Each
function here reads the switch, and so does ``Embed.losses``, which then takes
``token_losses`` of ``Embed.attend``'s logits. The switch is a context variable read when a
function is traced, not an argument, so that no signature or config carries it: trace
(``jax.jit``) the function inside the block, since a function jitted and called before keeps
its compiled tricks. It is for checks and debugging (slower, same masks, same losses up to
rounding); training keeps the tricks. ``tests/test_reference_mode.py`` compares the whole
model's loss and gradients with it.

A LayerNorm with its backward written out bought 1% of a bf16 step and was removed (issue 31):
``model.layers.layer_norm`` is Flax's, differentiated by autodiff.

Shapes follow ``model/attention.py``'s legend: B batch, T length, S keys, H heads, K head dim,
D model, V vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

_REFERENCE = contextvars.ContextVar("aiayn_reference_mode", default=False)


@contextlib.contextmanager
def reference_mode(on: bool = True) -> Iterator[None]:
    """Within the block, functions traced use plain autodiff and ``jax.random`` (``on``), or
    the tricks (``on=False``, the default outside any block)."""
    token = _REFERENCE.set(on)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def in_reference_mode() -> bool:
    """Whether code traced now should take the plain paths (see ``reference_mode``)."""
    return _REFERENCE.get()


def matmul(equation: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Einsum with inputs cast to the compute ``dtype`` and float32 accumulation.

    Accumulating in float32 keeps bf16 training accurate (and on CPU it is also what makes bf16
    matmuls fast). The backward pass runs in ``dtype`` too: the float32 cotangent of the result
    is cast to ``dtype`` before the two gradient matmuls, which again accumulate in float32.

    Args:
      equation: ``"A,B->C"`` with every index in two of the three terms (all of this
        project's projections).
      x, w: the operands, of any float dtype; their gradients come back in it.
      dtype: the compute dtype.

    Returns:
      The float32 result; callers cast it back once their bias/residual arithmetic is done.
    """
    dtype = jnp.dtype(dtype)
    # float32 takes the written-out backward too (autodiff's products then, up to rounding),
    # so that one path runs in every dtype and the float32 reference test covers it.
    if in_reference_mode():
        return jnp.einsum(
            equation, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
        )
    return _matmul(equation, dtype, x.dtype, w.dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matmul(equation, dtype, x_dtype, w_dtype, x, w):
    return _matmul_fwd(equation, dtype, x_dtype, w_dtype, x, w)[0]


def _matmul_fwd(equation, dtype, x_dtype, w_dtype, x, w):
    x, w = x.astype(dtype), w.astype(dtype)  # kept for the backward pass in ``dtype``
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32), (x, w)


def _matmul_bwd(equation, dtype, x_dtype, w_dtype, residuals, g):
    # For "A,B->C": dA = "C,B->A"(g, w) and dB = "A,C->B"(x, g).
    x, w = residuals
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    g = g.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def large_negative(dtype) -> jax.Array:
    """The score of a masked key: the value ``jax.nn.dot_product_attention`` uses, so that
    both agree on fully masked rows (a uniform average)."""
    return jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(K)) over S where ``mask`` allows: ``[B, H, T, S]`` float32.

    Args:
      q: ``[B, T, H, K]``. k: ``[B, S, H, K]``. mask: ``[B or 1, 1, T, S]`` bool.
    """
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32)
    logits *= jnp.asarray(q.shape[-1] ** -0.5, jnp.float32)
    logits = jnp.where(mask, logits, large_negative(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention``'s XLA path, with FlashAttention-2's backward pass.

    The forward takes float32 scores and softmax, and rounds the probabilities to the inputs'
    dtype for the product with the values. The backward is ``dS = P * (dP - rowsum(P * dP))``,
    masked, in the inputs' dtype for the two matmuls that take it (float32 accumulation);
    autodiff of the forward would run the softmax's gradient through its division and the
    dQ/dK products in float32.

    Args:
      q: ``[B, T, H, K]`` queries. k, v: ``[B, S, H, K]``. mask: ``[B or 1, 1, T, S]`` bool.

    Returns:
      ``[B, T, H, K]`` in ``v``'s dtype.
    """
    if in_reference_mode():
        return _softmax_attention_fwd(q, k, v, mask)[0]
    return _softmax_attention(q, k, v, mask)


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
    return _softmax_attention_fwd(q, k, v, mask)[0]


def _softmax_attention_fwd(q, k, v, mask):
    probs = attention_probs(q, k, mask).astype(v.dtype)
    out = jnp.einsum("bhts,bshk->bthk", probs, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype), (q, k, v, mask, probs)


def _softmax_attention_bwd(residuals, d_out):
    q, k, v, mask, probs = residuals
    d_out = d_out.astype(v.dtype)
    dv = jnp.einsum("bhts,bthk->bshk", probs, d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bthk,bshk->bhts", d_out, v, preferred_element_type=jnp.float32)
    p = probs.astype(jnp.float32)
    # Masked scores were replaced by a constant: no gradient reaches them.
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * (q.shape[-1] ** -0.5)
    ds = jnp.where(mask, ds, 0.0).astype(q.dtype)
    dq = jnp.einsum("bhts,bshk->bthk", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhts,bthk->bshk", ds, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def output_losses(
    y: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    label_smoothing: float,
    dtype,
) -> tuple[jax.Array, jax.Array]:
    """``model.embedding.token_losses`` of the logits ``y E^T (+ bias)``, backward written out.

    ``Embed.losses`` calls it (outside reference mode). Differentiated as written, the [B, T, V]
    part of a step would run its two gradient matmuls in float32 and transpose float32 logits.
    Here:

    * the gradient of the logits is formed once, cast to the compute ``dtype`` and multiplied
      with float32 accumulation, as the forward matmul;
    * only its softmax part goes through the vocabulary-sized pass and the matmuls; the
      smoothed target distribution (``1 - eps`` on the target, ``eps / V`` everywhere) is
      subtracted from their [B, T, D] and [V, D] results instead, with a gather and a
      scatter-add of the target rows (no one-hot compare over [B, T, V], and the subtracted
      part is not rounded to ``dtype``);
    * the target's logit and the mean logit (for the uniform part) are likewise taken from
      ``y``, ``E[targets]`` and the mean row of ``E``, not from passes over the logits.

    Args:
      y: ``[B, T, D]`` final features. embedding: ``[V, D]``. bias: ``[V]`` or None.
      targets: ``[B, T]`` int ids. label_smoothing: eps. dtype: the compute dtype.

    Returns:
      ``(smoothed [B, T], nll [B, T])``, float32, equal to ``token_losses`` of the logits up
      to float rounding.
    """
    dtypes = (jnp.dtype(dtype), y.dtype, embedding.dtype)
    return _output_losses(label_smoothing, dtypes, y, embedding, bias, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _output_losses(eps, dtypes, y, embedding, bias, targets):
    return _output_losses_fwd(eps, dtypes, y, embedding, bias, targets)[0]


def _output_losses_fwd(eps, dtypes, y, embedding, bias, targets):
    dtype = dtypes[0]
    yc, ec = y.astype(dtype), embedding.astype(dtype)
    logits = jnp.einsum("btd,vd->btv", yc, ec, preferred_element_type=jnp.float32)
    # The same products as the logits' (inputs rounded to ``dtype``), summed in float32.
    yf, ef = yc.astype(jnp.float32), ec.astype(jnp.float32)
    target = jnp.einsum("btd,btd->bt", yf, jnp.take(ef, targets, axis=0))
    mean = jnp.einsum("btd,d->bt", yf, jnp.mean(ef, axis=0))
    if bias is not None:
        bias32 = bias.astype(jnp.float32)
        logits = logits + bias32
        target = target + jnp.take(bias32, targets)
        mean = mean + jnp.mean(bias32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - target
    losses = ((1.0 - eps) * nll + eps * (lse - mean), nll)
    return losses, (yc, ec, logits, lse, targets, bias)


def _output_losses_bwd(eps, dtypes, residuals, cotangents):
    dtype, y_dtype, e_dtype = dtypes
    yc, ec, logits, lse, targets, bias = residuals
    g_smooth, g_nll = cotangents  # [B, T] each
    vocab = logits.shape[-1]
    # d/dlogits of g_smooth * ((1-eps) nll + eps uniform) + g_nll * nll
    #   = (g_smooth + g_nll) softmax - ((1-eps) g_smooth + g_nll) onehot - (eps/V) g_smooth.
    # Only the first term is [B, T, V]; the other two are applied to the products below.
    on_target = (1.0 - eps) * g_smooth + g_nll
    everywhere = eps / vocab * g_smooth
    dl = (jnp.exp(logits - lse[..., None]) * (g_smooth + g_nll)[..., None]).astype(dtype)
    dy = jnp.einsum("btv,vd->btd", dl, ec, preferred_element_type=jnp.float32)
    de = jnp.einsum("btv,btd->vd", dl, yc, preferred_element_type=jnp.float32)
    yf, ef = yc.astype(jnp.float32), ec.astype(jnp.float32)
    dy = dy - on_target[..., None] * jnp.take(ef, targets, axis=0)
    dy = dy - everywhere[..., None] * jnp.sum(ef, axis=0)
    flat_targets = targets.reshape(-1)
    de = de.at[flat_targets].add(-(on_target[..., None] * yf).reshape(-1, yf.shape[-1]))
    de = de - jnp.einsum("bt,btd->d", everywhere, yf)
    db = None
    if bias is not None:
        db = jnp.sum(dl.astype(jnp.float32), axis=(0, 1)) - jnp.sum(everywhere)
        db = db.at[flat_targets].add(-on_target.reshape(-1)).astype(bias.dtype)
    return dy.astype(y_dtype), de.astype(e_dtype), db, None


_output_losses.defvjp(_output_losses_fwd, _output_losses_bwd)

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
    """``jax.random.bits(key, shape, jnp.uint32)``, computed as one fusible expression.

    On CPU JAX lowers Threefry-2x32 as a rolled loop of 5 iterations over whole arrays, which
    XLA cannot fuse; this writes the same 20 rounds unrolled, as JAX's GPU/TPU lowering does.

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
    use_bits = not in_reference_mode() and jax.lax.dtype(p) == jnp.float32
    bits = threefry_bits(key, shape) if use_bits else None
    if bits is None:
        return jax.random.bernoulli(key, p, shape)
    # As jax.random.uniform: 23 random mantissa bits under the exponent of 1.0, minus 1.
    one = np.array(1.0, np.float32).view(np.uint32)
    u = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - 1.0
    return u < jnp.float32(p)
