"""The jit-compiled train and eval steps, and the model's FLOP count.

The loss is the model's own (``model.embedding.Embed.losses``, the label-smoothed
cross-entropy of its tied output head); this module feeds it the batch, sums and averages it.

A training batch is a dict of int32 ``[A, R, L]`` arrays (A micro-batches of R packed rows of
length L): ``inputs``, ``targets`` and their ``*_segmentation`` / ``*_position``. One call of
the train step is one optimizer update over all A micro-batches; gradients are summed over
micro-batches and divided by the total number of target tokens, so accumulation gives exactly
the gradient of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from model import Transformer, TransformerConfig, shift_right
from model.sharding import batch_sharding
from training.objectives import mlm_mask
from training.state import TrainState

# Ids below this are padding, EOS, BOS and UNK: never masked by the MLM.
FIRST_REGULAR_ID = max(PAD_ID, EOS_ID, BOS_ID, UNK_ID) + 1


def _model_inputs(model, batch, bos_id: int, rng) -> tuple[tuple, dict, jax.Array]:
    """The model's positional and keyword inputs for one batch, and the ids its positions
    predict ``[B, T]`` (0: not scored), for the objective of its architecture
    (``training.objectives``)."""
    kind = model.config.architecture
    dropout = {"deterministic": rng is None, "rngs": None if rng is None else {"dropout": rng}}
    segments = batch.get("targets_segmentation")
    if kind != "encoder_only":  # teacher forcing: the targets shifted right are the inputs
        decoder_input = shift_right(batch["targets"], bos_id, segments)
    if kind == "encoder_decoder":
        kwargs = {
            "src_segments": batch.get("inputs_segmentation"),
            "tgt_segments": segments,
            "src_positions": batch.get("inputs_position"),
            "tgt_positions": batch.get("targets_position"),
        }
        return (batch["inputs"], decoder_input), {**kwargs, **dropout}, batch["targets"]
    if kind == "decoder_only":
        kwargs = {"segments": segments, "positions": batch.get("targets_position")}
        return (decoder_input,), {**kwargs, **dropout}, batch["targets"]
    # encoder_only: both sides of the batch are sentences to fill in.
    both = {
        key: jnp.concatenate([batch[f"inputs{suffix}"], batch[f"targets{suffix}"]])
        for key, suffix in (("ids", ""), ("segments", "_segmentation"), ("positions", "_position"))
        if f"inputs{suffix}" in batch
    }
    # Masks are drawn from the step's key; evaluation (no key) uses one fixed masking.
    mask_rng = jax.random.fold_in(jax.random.key(0) if rng is None else rng, 1 << 20)
    inputs, targets = mlm_mask(
        mask_rng, both["ids"], vocab_size=model.config.vocab_size, first_regular_id=FIRST_REGULAR_ID
    )
    kwargs = {"segments": both.get("segments"), "positions": both.get("positions")}
    return (inputs,), {**kwargs, **dropout}, targets


def _head(module, *args, targets, label_smoothing, predict, **kwargs):
    """For ``model.apply(..., method=_head)``: the model's final features, then its output
    head's losses ``(smoothed, nll)`` ``[B, T]`` (``Embed.losses``) and, with ``predict``, the
    most likely id at each position ``[B, T]`` (else None)."""
    y = module(*args, features_only=True, **kwargs)
    smoothed, nll = module.embed.losses(y, targets, label_smoothing)
    predicted = jnp.argmax(module.embed.attend(y), axis=-1) if predict else None
    return smoothed, nll, predicted


def loss_sums(model, params, batch, bos_id: int, label_smoothing: float, rng, *, predict=False):
    """The training objective of one micro-batch: what ``make_train_step`` differentiates.

    Args:
      model: any model of the family. params: its parameters.
      batch: int32 ``[R, L]`` arrays, ``inputs``, ``targets`` and, packed, their
        ``*_segmentation`` / ``*_position``.
      bos_id: the decoder's start id. label_smoothing: eps.
      rng: the dropout (and MLM masking) key, or None for a deterministic pass.
      predict: also count the scored tokens predicted right.

    Returns:
      ``(summed smoothed loss, (summed NLL, scored token count))``, float32 scalars; with
      ``predict``, a third element: the int32 count of right predictions.
    """
    args, kwargs, targets = _model_inputs(model, batch, bos_id, rng)
    loss, nll, predicted = model.apply(
        {"params": params},
        *args,
        targets=targets,
        label_smoothing=label_smoothing,
        predict=predict,
        method=_head,
        **kwargs,
    )
    weights = (targets > 0).astype(jnp.float32)
    sums = jnp.sum(loss * weights), (jnp.sum(nll * weights), jnp.sum(weights))
    return (*sums, jnp.sum((predicted == targets) & (targets > 0))) if predict else sums


def make_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule: Callable,
    *,
    bos_id: int,
    label_smoothing: float,
) -> Callable:
    """Returns ``train_step(state, batch, rng, horizon=None) -> (state, metrics)`` (not jitted).

    The dropout key of step s is ``fold_in(rng, s)``: a resumed run draws the same masks as an
    uninterrupted one without saving any RNG state beyond the seed. ``horizon``
    (``training.state.schedule_horizon``), when given, sets the schedule's warmup, cooldown and
    total steps in place of the config's (``tx`` and ``schedule`` from ``make_optimizer``).
    """
    grad_fn = jax.value_and_grad(
        lambda p, b, r: loss_sums(model, p, b, bos_id, label_smoothing, r), has_aux=True
    )

    def train_step(state: TrainState, batch: dict, rng: jax.Array, horizon=None):
        rng = jax.random.fold_in(rng, state.step)
        micro_batches = batch["inputs"].shape[0]

        def micro(carry, xs):
            i, mb = xs
            (loss, (nll, n)), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
            acc = jax.tree.map(jnp.add, carry, (grads, loss, nll, n))
            return acc, None

        if micro_batches == 1:
            (loss, (nll, n)), grads = grad_fn(
                state.params, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(rng, 0)
            )
        else:
            zeros = (jax.tree.map(jnp.zeros_like, state.params), 0.0, 0.0, 0.0)
            xs = (jnp.arange(micro_batches), batch)
            (grads, loss, nll, n), _ = jax.lax.scan(micro, zeros, xs)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        extra = {} if horizon is None else {"horizon": horizon}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss / denom,
            "nll": nll / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step, **extra),
            "target_tokens": n,
        }
        return new_state, metrics

    return train_step


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Where a ``[A, R, L]`` training batch lives: its R rows split like any batch's."""
    return batch_sharding(mesh, ndim=3, batch_dim=1)


def jit_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule: Callable,
    mesh: Mesh,
    state_shardings,
    *,
    bos_id: int,
    label_smoothing: float,
) -> Callable:
    """``make_train_step`` compiled for ``mesh``: state kept in place (donated), batch split.

    Call it inside ``model.use_mesh(mesh)`` so the model's activation constraints apply. The
    result is called as ``train_step(state, batch, rng, horizon=None)``.
    """
    step = make_train_step(model, tx, schedule, bos_id=bos_id, label_smoothing=label_smoothing)
    compiled = jax.jit(
        step,
        in_shardings=(state_shardings, train_batch_sharding(mesh), None, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )

    def train_step(state, batch, rng, horizon=None):
        # jit with in_shardings takes positional arguments only; horizon stays optional here.
        return compiled(state, batch, rng, horizon)

    return train_step


def make_eval_step(model: Transformer, *, bos_id: int, label_smoothing: float) -> Callable:
    """Returns ``eval_step(params, batch) -> (loss_sum, nll_sum, tokens, correct)`` for padded
    batches: ``correct`` counts the scored tokens whose most likely prediction is the target
    (the masked-token accuracy of an encoder-only model; next-token accuracy otherwise)."""

    def eval_step(params, batch):
        loss, (nll, n), correct = loss_sums(
            model, params, batch, bos_id, label_smoothing, None, predict=True
        )
        return loss, nll, n, correct

    return eval_step


def train_flops_per_step(cfg: TransformerConfig, rows: int, length: int) -> float:
    """Model FLOPs of one training step on ``rows`` packed rows of ``length`` tokens per side.

    Counts matmuls only (2 FLOPs per multiply-add), forward + backward = 3x forward, with full
    ``length x length`` attention (what the packed kernels compute), as in MFU accounting.
    A decoder-only model reads one side per row, an encoder-only model both sides.
    """
    d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, rows * length
    attention_proj = 4 * d * d
    ffn = 2 * d * f
    attentions = 2 if cfg.architecture == "encoder_decoder" else 1  # with cross-attention
    encoder = cfg.num_encoder_layers * (attention_proj + ffn + 2 * length * d)
    decoder = cfg.num_decoder_layers * attentions * (attention_proj + 2 * length * d)
    decoder += cfg.num_decoder_layers * ffn
    if cfg.architecture == "encoder_only":  # both sides are encoded; the MLM head's dense layer
        forward = 2 * (2 * n) * (encoder + d * d + d * v)
    else:  # a decoder-only model reads the target side only (its encoder has no layers)
        forward = 2 * n * (encoder + decoder + d * v)
    return 3.0 * forward
