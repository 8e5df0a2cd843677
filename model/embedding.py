"""Token embedding plus positions, the tied output head and its loss (sections 3.4, 3.5, 5.4).

One module holds the embedding matrix shared by the encoder input, the decoder input and the
pre-softmax projection, so every model of the family (``Transformer``, ``DecoderOnlyLM``,
``EncoderOnly``) embeds and projects the same way: ``Embed.attend`` is the one place the logits
are written, and ``Embed.losses`` the training loss over them (``training.step`` calls it
through the model). Shapes: B batch, T length, D model, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.config import TransformerConfig
from model.dropout import Dropout
from model.layers import sinusoidal_positions
from model.tricks import in_reference_mode, matmul, output_losses


def token_losses(
    logits: jax.Array, targets: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token label-smoothed cross-entropy and plain negative log-likelihood.

    Label smoothing as in section 5.4 (Szegedy et al.): the target distribution puts
    ``1 - eps`` on the reference token and spreads ``eps`` uniformly over the whole vocabulary
    (``optax.smooth_labels``), written without materialising the one-hot matrix.

    Args:
      logits: ``[B, T, V]`` float32.
      targets: ``[B, T]`` int ids.
      label_smoothing: eps.

    Returns:
      ``(smoothed [B, T], nll [B, T])``, float32.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    uniform = -jnp.mean(logp, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform, nll


class Embed(nn.Module):
    """Embedding shared by inputs and the output projection, plus the positional encodings.

    Parameters: ``embedding [V, D]`` and, with ``config.logits_bias``, ``logits_bias [V]``.
    The position table is a constant of ``config.max_positions`` rows, not a parameter.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            cfg.params_dtype,
        )
        if cfg.logits_bias:
            self.logits_bias = self.param(
                "logits_bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                (cfg.vocab_size,),
                cfg.params_dtype,
            )
        self.position_table = sinusoidal_positions(
            cfg.max_positions, cfg.d_model, cfg.positional_encoding
        )
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(
        self, ids: jax.Array, positions: jax.Array | None = None, *, deterministic: bool = True
    ) -> jax.Array:
        """``Dropout(Embed(ids) * sqrt(D) + PE(positions))``.

        Args:
          ids: ``[B, T]`` int ids.
          positions: ``[B, T]`` int positions (packed rows restart them per example), or None
            for ``0 .. T - 1``.
          deterministic: disables dropout.

        Returns:
          ``[B, T, D]`` in the compute dtype (the sum is taken in float32).
        """
        cfg = self.config
        length = ids.shape[1]
        if length > cfg.max_positions:
            raise ValueError(
                f"sequence length {length} exceeds TransformerConfig.max_positions="
                f"{cfg.max_positions}"
            )
        if positions is None:
            pe = self.position_table[None, :length]
        else:
            pe = jnp.take(self.position_table, positions, axis=0)
        x = jnp.take(self.embedding, ids, axis=0).astype(jnp.float32) * math.sqrt(cfg.d_model)
        # Rounded to the compute dtype before the positions are added, as since the first
        # release, so that bf16 models keep their outputs bit for bit.
        x = x.astype(cfg.compute_dtype).astype(jnp.float32) + pe
        x = self.dropout(x, deterministic=deterministic).astype(cfg.compute_dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> float32 logits ``[B, T, V]`` with the transposed embedding matrix.

        With ``config.logits_bias`` a learned ``[V]`` bias (Marian's ``final_logits_bias``) is
        added.
        """
        cfg = self.config
        logits = matmul("btd,vd->btv", x, self.embedding, cfg.compute_dtype)
        if cfg.logits_bias:
            logits = logits + self.logits_bias.astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def losses(
        self, y: jax.Array, targets: jax.Array, label_smoothing: float
    ) -> tuple[jax.Array, jax.Array]:
        """``token_losses(self.attend(y), targets, label_smoothing)``: the training loss.

        Computed by ``model.tricks.output_losses`` (the same values up to float rounding, with
        its backward pass written out), or as written in reference mode.

        Args:
          y: ``[B, T, D]`` final features (a model's ``features_only=True`` output).
          targets: ``[B, T]`` int ids each position predicts (any id; the caller weights).
          label_smoothing: eps.

        Returns:
          ``(smoothed [B, T], nll [B, T])``, float32.
        """
        if in_reference_mode():
            return token_losses(self.attend(y), targets, label_smoothing)
        bias = self.logits_bias if self.config.logits_bias else None
        return output_losses(
            y, self.embedding, bias, targets, label_smoothing, self.config.compute_dtype
        )
