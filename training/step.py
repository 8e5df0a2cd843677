"""The jit-compiled train and eval steps, the loss, and the model's FLOP count.

A training batch is a dict of int32 ``[A, R, L]`` arrays (A micro-batches of R packed rows of
length L): ``inputs``, ``targets`` and their ``*_segmentation`` / ``*_position``. One call of
the train step is one optimizer update over all A micro-batches; gradients are summed over
micro-batches and divided by the total number of target tokens, so accumulation gives exactly
the gradient of the whole batch.
"""

from __future__ import annotations

import functools
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


def output_losses(
    y: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    label_smoothing: float,
    dtype,
) -> tuple[jax.Array, jax.Array]:
    """``token_losses`` of the logits ``y E^T (+ bias)``, with a hand-written backward pass.

    The [B, T, V] part of a step (logits, softmax and their gradients) is the largest of the
    default model's bf16 step; differentiated as written it runs its two gradient matmuls in
    float32 and transposes float32 logits. Here:

    * the gradient of the logits is formed once, cast to the compute ``dtype`` and multiplied
      with float32 accumulation, as the forward matmul;
    * only its softmax part goes through the vocabulary-sized pass and the matmuls; the
      smoothed target distribution (``1 - eps`` on the target, ``eps / V`` everywhere) is
      subtracted from their [B, T, D] and [V, D] results instead, with a gather and a
      scatter-add of the target rows. That pass is the costliest elementwise one of the
      step: without the one-hot compare it took 9.6 instead of 14.8 ms on the probe model
      (2-core Intel Xeon with AMX), and the subtracted part is no longer rounded to ``dtype``;
    * the target's logit and the mean logit (for the uniform part) are likewise taken from
      ``y``, ``E[targets]`` and the mean row of ``E``, not from passes over the logits.

    Args:
      y: ``[B, T, D]`` decoder output (``Transformer(..., features_only=True)``).
      embedding: ``[V, D]`` the tied output projection. bias: ``[V]`` or None.
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


def _forward_features(model, params, batch, bos_id: int, rng):
    """The model's final features ``[B, T, D]`` and the ids they predict ``[B, T]`` (0: not
    scored), for the objective of its architecture (``training.objectives``)."""
    kind = model.config.architecture
    dropout = {"deterministic": rng is None, "rngs": None if rng is None else {"dropout": rng}}
    segments = batch.get("targets_segmentation")
    if kind == "encoder_decoder":
        y = model.apply(
            {"params": params},
            batch["inputs"],
            shift_right(batch["targets"], bos_id, segments),
            src_segments=batch.get("inputs_segmentation"),
            tgt_segments=segments,
            src_positions=batch.get("inputs_position"),
            tgt_positions=batch.get("targets_position"),
            features_only=True,
            **dropout,
        )
        return y, batch["targets"]
    if kind == "decoder_only":
        y = model.apply(
            {"params": params},
            shift_right(batch["targets"], bos_id, segments),
            segments=segments,
            positions=batch.get("targets_position"),
            features_only=True,
            **dropout,
        )
        return y, batch["targets"]
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
    y = model.apply(
        {"params": params},
        inputs,
        segments=both.get("segments"),
        positions=both.get("positions"),
        features_only=True,
        **dropout,
    )
    return y, targets


def _sums(model, params, batch, bos_id: int, label_smoothing: float, rng, *, features=False):
    """Summed smoothed loss and ``(summed NLL, scored token count)`` of one (packed) batch;
    with ``features``, also the final features ``[B, T, D]`` and the targets they predict."""
    y, targets = _forward_features(model, params, batch, bos_id, rng)
    embed = params["embed"]
    loss, nll = output_losses(
        y,
        embed["embedding"],
        embed.get("logits_bias"),
        targets,
        label_smoothing,
        model.config.compute_dtype,
    )
    weights = (targets > 0).astype(jnp.float32)
    sums = jnp.sum(loss * weights), (jnp.sum(nll * weights), jnp.sum(weights))
    return (*sums, y, targets) if features else sums


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
        lambda p, b, r: _sums(model, p, b, bos_id, label_smoothing, r), has_aux=True
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
        loss, (nll, n), y, targets = _sums(
            model, params, batch, bos_id, label_smoothing, None, features=True
        )
        embed = params["embed"]
        logits = jnp.einsum(
            "btd,vd->btv", y, embed["embedding"].astype(y.dtype), preferred_element_type=jnp.float32
        )
        if "logits_bias" in embed:
            logits = logits + embed["logits_bias"].astype(logits.dtype)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * (targets > 0))
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
