"""Training state, the paper's optimizer (`OptimizerConfig`), and both sharded over a mesh."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from model import Transformer, TransformerConfig, init_inputs
from model.encoder_only import model_vocab_size
from model.sharding import LOGICAL_RULES
from runtime.hardware import resolve_dtype

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the data iterator state is saved beside it).

    Attributes:
      step: int32 [], optimizer updates done.
      params: the model parameters (float32 by default).
      opt_state: Adam's moments, shaped and sharded like ``params``.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
    """The TransformerConfig named by ``config.model`` (a preset plus overrides).

    ``dtype="auto"`` becomes this machine's choice (``runtime.hardware.resolve_dtype``);
    TransformerConfig itself only takes concrete dtypes.
    """
    preset = config.model.preset
    if preset not in ("base", "big", "tiny"):
        raise ValueError(
            f"config.model.preset must be 'base', 'big', 'tiny' or 'init_from', got {preset!r}"
        )
    overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
    if overrides.get("dtype") == "auto":  # train.py resolves it first (and logs why); others here
        overrides["dtype"], _ = resolve_dtype("auto")
    # An encoder-only model has one more embedding row than the tokenizer: its mask id.
    vocab_size = model_vocab_size(overrides.get("architecture", "encoder_decoder"), vocab_size)
    return getattr(TransformerConfig, preset)(vocab_size, **overrides)


def schedule_horizon(
    warmup_steps: float, cooldown_steps: float = 0, total_steps: float = 0, rate_factor: float = 1.0
) -> jax.Array:
    """The schedule's run-dependent numbers as one float32 ``[4]`` array (a train step input).

    ``config.train_minutes`` picks the number of steps (and may shrink warmup and cooldown) only
    after the first steps have run, so these numbers reach the compiled step as an argument,
    not as constants: changing them needs no recompilation.
    """
    return jnp.asarray([warmup_steps, cooldown_steps, total_steps, rate_factor], jnp.float32)


def learning_rate_schedule(
    d_model: int,
    warmup_steps: int,
    scale: float = 1.0,
    *,
    cooldown_steps: int = 0,
    total_steps: int = 0,
):
    """Section 5.3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5).

    ``step`` counts from 1 at the first update (optax counts from 0). With ``cooldown_steps``
    > 0 (not in the paper; 0 by default) the rate is also multiplied by a linear ramp from 1
    down to 0 over the last ``cooldown_steps`` of ``total_steps``: a run with a fixed budget
    then ends at a low rate instead of stopping midway down the inverse square root.

    Returns:
      ``schedule(count, horizon=None)``: the rate of update ``count``. ``horizon`` (from
      ``schedule_horizon``) replaces warmup, cooldown and total steps given here, and multiplies
      the rate by its ``rate_factor``; it may be a traced value.

    Raises:
      ValueError: if the cooldown is negative or longer than the run.
    """
    if cooldown_steps < 0 or (cooldown_steps and cooldown_steps > total_steps):
        raise ValueError(
            f"cooldown_steps={cooldown_steps} must be in [0, num_train_steps={total_steps}]"
        )
    default = (warmup_steps, cooldown_steps, total_steps, 1.0)

    def schedule(count, horizon=None):
        warmup, cooldown, total, factor = default if horizon is None else list(horizon)
        count = jnp.asarray(count, jnp.float32)
        step = count + 1.0
        rate = scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup**-1.5) * factor
        ramp = jnp.clip((total - count) / jnp.maximum(cooldown, 1), 0.0, 1.0)
        return jnp.where(cooldown > 0, rate * ramp, rate)

    return schedule


def _scale_by_schedule(schedule) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_learning_rate(schedule)`` that also passes ``horizon=`` to the schedule.

    Same state (``ScaleByScheduleState``) as optax's, so checkpoints keep their layout; the
    train step gives ``tx.update(..., horizon=h)`` (see ``schedule_horizon``).
    """

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, horizon=None, **extra):
        del params, extra
        rate = schedule(state.count, horizon)
        updates = jax.tree.map(lambda g: jnp.asarray(-rate, g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The training config's fields that the optimizer and its schedule read, and nothing else.

    Attributes:
      warmup_steps: linear warmup of the paper's schedule (section 5.3).
      lr_scale: multiplies the paper's learning rate.
      adam_b1, adam_b2, adam_eps: Adam's settings (the paper: 0.9, 0.98, 1e-9).
      grad_clip_norm: clip gradients to this global norm (0: no clipping, as in the paper).
      cooldown_steps: linear ramp to 0 over the last steps (0: none, as in the paper).
      num_train_steps: the run's length, where the cooldown ends (used only with a cooldown).
    """

    warmup_steps: int
    lr_scale: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    grad_clip_norm: float
    cooldown_steps: int = 0
    num_train_steps: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> OptimizerConfig:
        """Picks the optimizer's fields out of a training config (configs/common.py's fields).

        ``cooldown_steps`` and ``num_train_steps`` may be absent (0, as before they existed).
        """
        return cls(
            warmup_steps=config.warmup_steps,
            lr_scale=config.lr_scale,
            adam_b1=config.adam_b1,
            adam_b2=config.adam_b2,
            adam_eps=config.adam_eps,
            grad_clip_norm=config.grad_clip_norm,
            cooldown_steps=config.get("cooldown_steps", 0),
            num_train_steps=config.get("num_train_steps", 0),
        )


def make_optimizer(opt: OptimizerConfig, d_model: int):
    """Adam(beta1 0.9, beta2 0.98, eps 1e-9) on the paper's schedule, optional clipping.

    ``tx.update`` takes an optional ``horizon=`` (``schedule_horizon``) that overrides the
    config's warmup, cooldown and total steps; without it they are the config's.

    Args:
      opt: the settings (``OptimizerConfig.from_config(config)`` for a training config).
      d_model: the model width, which scales the paper's learning rate.

    Returns:
      ``(optax.GradientTransformation, schedule)``.
    """
    cooldown, total = opt.cooldown_steps, opt.num_train_steps
    if cooldown > total:  # e.g. a short trial run of a config made for a long one
        log.warning(
            "cooldown_steps=%d is longer than num_train_steps=%d: cooling down over the whole run",
            cooldown,
            total,
        )
        cooldown = total
    schedule = learning_rate_schedule(
        d_model, opt.warmup_steps, opt.lr_scale, cooldown_steps=cooldown, total_steps=total
    )
    # optax.adam(schedule) is this chain; spelled out so the schedule can take the horizon.
    adam = optax.chain(
        optax.scale_by_adam(b1=opt.adam_b1, b2=opt.adam_b2, eps=opt.adam_eps),
        _scale_by_schedule(schedule),
    )
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adam), schedule
    return adam, schedule


def _init_fn(model: Transformer, tx: optax.GradientTransformation, boxed: bool):
    args = init_inputs(model.config)

    def init(rng):
        params = model.init(rng, *args)["params"]
        params = params if boxed else nn.unbox(params)
        return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params))

    return init


def state_shardings(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh):
    """Where every leaf of the training state lives, and its abstract shapes.

    Shardings come from the parameters' logical axis names and ``LOGICAL_RULES`` (Adam's
    moments follow their parameters); nothing is allocated.

    Returns:
      ``(shardings, abstract)``: TrainState-shaped trees of ``NamedSharding`` and of
      ``jax.ShapeDtypeStruct`` carrying those shardings (what Orbax restores into).
    """
    boxed = jax.eval_shape(_init_fn(model, tx, boxed=True), jax.random.key(0))
    # get_partition_spec turns each boxed leaf into its logical spec and the rest into P().
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)
    shapes = jax.eval_shape(_init_fn(model, tx, boxed=False), jax.random.key(0))
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return shardings, abstract


def init_state(model: Transformer, tx: optax.GradientTransformation, shardings, rng: jax.Array):
    """Initialises parameters and optimizer state directly in their sharded places.

    Nothing is materialised on one device first, so a model larger than one device initialises.
    """
    return jax.jit(_init_fn(model, tx, boxed=False), out_shardings=shardings)(rng)
