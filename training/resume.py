"""How a run starts: resume its workdir, start from another workdir's parameters, or anew.

- A workdir with checkpoints resumes from the newest usable one (``checkpoints.restore_latest``:
  damaged ones are set aside, one that does not fit the configuration stops the run).
- Otherwise ``config.init_from`` (fine-tuning) takes the parameters of another workdir's
  checkpoint with a fresh optimizer, step 0 and a fresh input order; its tokenizer is copied so
  the embeddings keep their meaning, and a different model configuration is refused.
- Otherwise the model is initialised from ``config.seed``.

The configuration files are written only once the run is known to start, so a refused start
leaves the workdir's checkpoints and configuration files as they were.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import jax
import ml_collections

from model import TransformerConfig
from runtime import hardware
from training.state import TrainState, init_state
from workdirs import checkpoints
from workdirs.files import MODEL_CONFIG, config_dict, model_config_diff, saved_model_field

log = logging.getLogger("train")


def parse_init_from(init_from: str, workdir: Path) -> tuple[Path, str | int]:
    """``(source workdir, which checkpoint)`` named by ``config.init_from``.

    Accepted: ``WORKDIR`` (its newest regular checkpoint), ``WORKDIR/best``,
    ``WORKDIR/averaged`` or ``WORKDIR/checkpoints/STEP``.

    Raises:
      ValueError: another form, or the run's own workdir.
    """
    path = Path(init_from).expanduser()
    if (path / MODEL_CONFIG).exists():
        source, which = path, "latest"
    elif path.name in ("best", "averaged"):
        source, which = path.parent, path.name
    elif path.parent.name == "checkpoints" and path.name.isdigit():
        source, which = path.parent.parent, int(path.name)
    else:
        raise ValueError(
            f"config.init_from={init_from!r}: expected a training workdir (with "
            "model_config.json), WORKDIR/best, WORKDIR/averaged or WORKDIR/checkpoints/STEP"
        )
    if source.resolve() == workdir.resolve():
        raise ValueError(
            f"config.init_from={init_from!r} is this run's own --workdir; fine-tuning writes a "
            "new workdir (the source stays untouched)"
        )
    return source, which


def has_checkpoints(workdir: Path) -> bool:
    """Whether the workdir holds a (complete) regular checkpoint."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and bool(checkpoints.ocp.utils.checkpoint_steps(directory))


# Fields fine-tuning may change: they do not change the parameters.
_TRAINING_ONLY = ("dropout_rate", "attention_dropout_rate", "dtype")


def source_model_config(
    config: ml_collections.ConfigDict, source: Path | None
) -> TransformerConfig:
    """``config.model.preset = "init_from"``: the source workdir's model, with the config's
    overrides of the fields fine-tuning may change (dropout, compute dtype)."""
    if source is None:
        raise ValueError("config.model.preset='init_from' needs config.init_from=WORKDIR")
    path = source / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"config.init_from: missing {path}")
    values = json.loads(path.read_text())
    overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
    others = sorted(set(overrides) - set(_TRAINING_ONLY))
    if others:
        raise ValueError(
            f"config.model.overrides {others}: with preset='init_from' only {_TRAINING_ONLY} may "
            "be set (the rest is the source model's)"
        )
    return TransformerConfig.from_dict({**values, **overrides})


def check_same_model(source: Path, model_cfg: TransformerConfig) -> None:
    """Refuses an ``init_from`` source whose model differs from ``model_cfg`` (but for the
    fields fine-tuning may change)."""
    path = source / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"config.init_from: missing {path}")
    diff = {k: v for k, v in model_config_diff(path, model_cfg).items() if k not in _TRAINING_ONLY}
    if diff:
        raise ValueError(
            f"config.init_from: {path} describes another model than this config (field: "
            f"(source, new)): {diff}; fine-tuning keeps the model, so set those fields as there"
        )


def start_state(
    config: ml_collections.ConfigDict,
    workdir: Path,
    *,
    model,
    model_cfg: TransformerConfig,
    tx,
    shardings,
    abstract: TrainState,
    mngr,
    batch: dict,
) -> tuple[TrainState, dict | None, dict]:
    """The state to train from: ``(state, data_state or None, meta)`` (see the module doc)."""
    restored = checkpoints.restore_latest(mngr, abstract, config=config_dict(config), batch=batch)
    if restored is not None:
        state, data_state, meta = restored
        if config.get("init_from"):
            log.info("the workdir has checkpoints: resuming them (init_from is used only once)")
        log.info("resumed from step %d", int(state.step))
        return state, data_state, meta
    if not config.get("init_from"):
        log.info("initialised a new model")
        return init_state(model, tx, shardings, jax.random.key(config.seed)), None, {}
    source, which = parse_init_from(config.init_from, workdir)
    check_same_model(source, model_cfg)
    kind, step = checkpoints.resolve(source, which)
    params, _ = checkpoints.load_params(
        source, step if kind == "checkpoints" else kind, abstract.params
    )
    # Adam's moments start at zero and the schedule at step 0: a fresh optimizer.
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step0 = jax.device_put(jax.numpy.zeros((), jax.numpy.int32), shardings.step)
    log.info("fine-tuning: parameters of %s/%s/%d, a fresh optimizer, step 0", source, kind, step)
    return TrainState(step=step0, params=params, opt_state=opt_state), None, {}


def resolve_config(config, workdir: str | Path | None = None):
    """A copy of ``config`` with ``model.overrides.dtype`` resolved (``"auto"`` replaced by this
    machine's choice, or by the dtype ``WORKDIR/model_config.json`` was started with), logged.

    The copy is what the run uses and writes (``config.json``, checkpoint metadata), so a resumed
    run compares like with like; the caller's config is left as it was.
    """
    requested = config.model.overrides.get("dtype")
    if requested is None:  # the preset's dtype
        return config
    saved = saved_model_field(workdir, "dtype") if workdir is not None else None
    dtype, reason = hardware.resolve_workdir_dtype(requested, saved)
    log.info("compute dtype %s (%s)", dtype, reason)
    if dtype == requested:
        return config
    resolved = copy.deepcopy(config)
    resolved.model.overrides.dtype = dtype
    return resolved
