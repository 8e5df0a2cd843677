"""Building blocks: sinusoidal positions, feed-forward, LayerNorm.

Shapes follow the legend in ``model/attention.py``: B batch, T length, D model, F feed-forward,
V vocabulary.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn

from model.config import TransformerConfig
from model.tricks import matmul


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
