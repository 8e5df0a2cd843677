"""Building blocks: the low-precision matmul and output loss, positions, feed-forward, LayerNorm.

Shapes follow the legend in ``model/attention.py``: B batch, T length, D model, F feed-forward,
V vocabulary.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from model.config import TransformerConfig


def matmul(equation: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Einsum with inputs cast to the compute ``dtype`` and float32 accumulation.

    Accumulating in float32 keeps bf16 training accurate, and on CPU it is also what makes bf16
    matmuls fast (a plain bf16 x bf16 -> bf16 dot gains almost nothing there). In a lower
    precision the backward pass runs in it too: the float32 cotangent of the result is cast to
    ``dtype`` before the two gradient matmuls (which again accumulate in float32), as mixed
    precision training does; differentiating the einsum as written would instead multiply a
    float32 cotangent by a bf16 operand, which XLA runs as a float32 matmul (2.5x slower on a
    CPU with bf16 units, measured on the FFN of the default model).

    Returns:
      The float32 result; callers cast it back once their bias/residual arithmetic is done.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    return _low_precision_matmul(equation, dtype, x.dtype, w.dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _low_precision_matmul(equation, dtype, x_dtype, w_dtype, x, w):
    return jnp.einsum(
        equation, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
    )


def _low_precision_matmul_fwd(equation, dtype, x_dtype, w_dtype, x, w):
    x, w = x.astype(dtype), w.astype(dtype)  # kept for the backward pass in ``dtype``
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32), (x, w)


def _low_precision_matmul_bwd(equation, dtype, x_dtype, w_dtype, residuals, g):
    # For "A,B->C" (every index in two of the three terms, as in all of this project's
    # einsums): dA = "C,B->A"(g, w) and dB = "A,C->B"(x, g).
    x, w = residuals
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    g = g.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def output_losses(
    y: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    label_smoothing: float,
    dtype,
) -> tuple[jax.Array, jax.Array]:
    """``model.embedding.token_losses`` of the logits ``y E^T (+ bias)``, backward written out.

    ``Embed.losses`` calls it. Differentiated as written, the [B, T, V]
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


def sinusoidal_positions(
    num_positions: int, d_model: int, layout: str = "interleaved", max_timescale: float = 1e4
) -> np.ndarray:
    """The fixed positional encodings, float32 ``[num_positions, D]``.

    ``"interleaved"`` is the paper's section 3.5:
        PE(pos, 2i) = sin(pos / 10000^(2i / d_model)),  PE(pos, 2i + 1) = cos(same angle).
    ``"concat"`` is tensor2tensor's ``get_timing_signal_1d``: sines in the first half, cosines in
    the second, with timescales spaced geometrically from 1 to 10000 over ``D/2`` channels.
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    if layout == "interleaved":
        two_i = np.arange(0, d_model, 2, dtype=np.float64)
        angles = pos / np.power(max_timescale, two_i / d_model)  # [L, ceil(D/2)]
        pe = np.zeros((num_positions, d_model), dtype=np.float64)
        pe[:, 0::2] = np.sin(angles)
        pe[:, 1::2] = np.cos(angles[:, : d_model // 2])
    elif layout == "concat":
        half = d_model // 2
        increment = math.log(max_timescale) / max(half - 1, 1)
        inv_timescales = np.exp(np.arange(half, dtype=np.float64) * -increment)
        angles = pos * inv_timescales[None, :]
        pe = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    else:
        raise ValueError(
            f"unknown positional layout {layout!r}; expected 'interleaved' or 'concat'"
        )
    return pe.astype(np.float32)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, ``[B, T, D] -> [B, T, D]``.

    With the default ``act = relu`` this is the paper's equation 2, max(0, x W1 + b1) W2 + b2.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = nn.initializers.xavier_uniform()
        zeros = nn.initializers.zeros_init()
        w1 = self.param(
            "wi",
            nn.with_logical_partitioning(dense, ("embed", "mlp")),
            (cfg.d_model, cfg.d_ff),
            cfg.params_dtype,
        )
        b1 = self.param(
            "bi", nn.with_logical_partitioning(zeros, ("mlp",)), (cfg.d_ff,), cfg.params_dtype
        )
        w2 = self.param(
            "wo",
            nn.with_logical_partitioning(dense, ("mlp", "embed")),
            (cfg.d_ff, cfg.d_model),
            cfg.params_dtype,
        )
        b2 = self.param(
            "bo", nn.with_logical_partitioning(zeros, ("embed",)), (cfg.d_model,), cfg.params_dtype
        )
        h = ACTIVATIONS[cfg.activation](matmul("btd,df->btf", x, w1, cfg.compute_dtype) + b1)
        h = nn.with_logical_constraint(h.astype(cfg.compute_dtype), ("batch", "length", "mlp"))
        y = matmul("btf,fd->btd", h, w2, cfg.compute_dtype) + b2
        return y.astype(cfg.compute_dtype)


def layer_norm(config: TransformerConfig, name: str | None = None) -> nn.LayerNorm:
    """Flax's LayerNorm over D, with learned ``scale`` and ``bias [D]`` (logical axis
    ``embed``); statistics in float32, output in the compute dtype."""
    boxed = nn.with_logical_partitioning
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        scale_init=boxed(nn.initializers.ones_init(), ("embed",)),
        bias_init=boxed(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )
