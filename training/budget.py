"""A wall-clock budget: ``--config.train_minutes=M`` picks the number of steps that fits M minutes.

How the number is chosen (``SpeedProbe`` and ``plan_from_speed``):

- The first step compiles and is not timed. The next ``MEASURE_STEPS`` steps are (fewer if they
  take ``MEASURE_SECONDS`` already), each on its own, minus any time spent evaluating or saving
  meanwhile; their median is the speed.
- The budget counts from the start of ``training.loop.train_and_evaluate``: data and tokenizer
  set-up, compilation and the measured steps are already spent. Of what is left,
  ``OVERHEAD_SHARE`` is set aside for the evaluations and checkpoints still to come and the
  final evaluation (the default config spent 1.4 of its 29.7 minutes on them); the rest is
  divided by the measured seconds per step. ``num_train_steps`` caps the result; a capped run
  is the one the config describes without a budget (its warmup and cooldown as they are).
- Warmup and cooldown must fit in the run: when ``warmup_steps + cooldown_steps`` exceeds the
  steps chosen, both shrink in proportion to fill it exactly, and the rate is multiplied by
  ``sqrt(new warmup / warmup_steps)`` so the peak rate stays the configured one (the paper's
  schedule peaks at ``d_model^-0.5 * warmup^-0.5``, which a shorter warmup would raise).

A second look (``replan``): the first steps' speed leaves out what a whole run also spends,
the evaluations and checkpoints (whose count grows with the steps chosen) and the steps'
slower moments (the default config's run went at 0.181 s/step where its first steps' median was
0.171, and its 25 minutes took 26.9). So once a third of the chosen steps beyond the first
look have run (``REPLAN_SHARE``), the rate since the first look, everything included, sets the
last step again, keeping one evaluation's time for the final one. Only the end moves: the
second look happens only once the warmup is over and before the cooldown starts, and the
cooldown keeps its length (a budget too short for it overruns, with a warning).

The measured steps train with the configured warmup and cooldown; the chosen numbers apply from
the next step on (they reach the compiled step as an input, ``training.state.schedule_horizon``,
so nothing recompiles). The plan is saved in every later checkpoint's metadata (``meta['plan']``)
and a resumed run keeps it instead of measuring again, so its schedule and its last step are
those of the run it continues. A run stopped before the plan was made measures again (its
budget counted from its own start); one resumed between the two looks keeps the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time

import jax
import ml_collections
import numpy as np

from training.metrics import Window

log = logging.getLogger("train")

MEASURE_STEPS = 20  # timed steps (after the compiling one) before the number is chosen
MEASURE_SECONDS = 30.0  # ... or fewer (at least 2) once they took this long
OVERHEAD_SHARE = 0.05  # of the remaining time, for evaluations, checkpoints, the final eval
REPLAN_SHARE = 1 / 3  # of the steps chosen beyond the first look, run before the second look


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long the run is and the schedule numbers that depend on it.

    Attributes:
      num_train_steps: the last step.
      warmup_steps: the schedule's warmup.
      cooldown_steps: the linear cooldown at the end (0: none).
      rate_factor: multiplies the learning rate (below 1 only where the warmup was shrunk).
      train_minutes: the budget it was chosen for (0: ``num_train_steps`` from the config).
      seconds_per_step: the measured speed it was chosen from (0 without a budget); after
        the second look, the rate with evaluations and checkpoints included.
      replanned_at: the step of the second look (0: not taken, see ``replan``).
    """

    num_train_steps: int
    warmup_steps: int
    cooldown_steps: int
    rate_factor: float = 1.0
    train_minutes: float = 0.0
    seconds_per_step: float = 0.0
    replanned_at: int = 0

    def horizon(self):
        """The train step's schedule input (``training.state.schedule_horizon``)."""
        from training.state import schedule_horizon

        return schedule_horizon(
            self.warmup_steps, self.cooldown_steps, self.num_train_steps, self.rate_factor
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


def fixed_plan(config: ml_collections.ConfigDict) -> Plan:
    """The plan without a budget: the config's steps, warmup and cooldown.

    A cooldown longer than the run covers the whole run (``training.state.make_optimizer``
    warns about it).
    """
    total = config.num_train_steps
    return Plan(total, config.warmup_steps, min(config.get("cooldown_steps", 0), total))


def start_plan(config: ml_collections.ConfigDict, meta: dict) -> tuple[Plan, bool]:
    """The plan a run starts with, given the metadata of the checkpoint it resumes (or ``{}``).

    Returns:
      ``(plan, measure)``: with ``measure`` True the plan is provisional (the config's numbers)
      until ``plan_from_speed`` replaces it after the first steps.
    """
    minutes = config.get("train_minutes", 0.0)
    saved = meta.get("plan")
    if not minutes:
        if saved and saved.get("train_minutes"):
            log.warning(
                "train_minutes=0: ignoring the plan saved with the checkpoint (%d steps for %g "
                "minutes) and training to num_train_steps=%d",
                saved["num_train_steps"], saved["train_minutes"], config.num_train_steps,
            )  # fmt: skip
        return fixed_plan(config), False
    if saved and saved.get("train_minutes"):
        plan = Plan.from_dict(saved)
        if plan.train_minutes != minutes:
            log.warning(
                "train_minutes=%g, but this workdir's steps were chosen for %g minutes: keeping "
                "them (a new --workdir measures again)",
                minutes, plan.train_minutes,
            )  # fmt: skip
        log.info(
            "train_minutes: keeping the saved plan of %d steps (warmup %d, cooldown %d, chosen "
            "at %.3f s/step)",
            plan.num_train_steps, plan.warmup_steps, plan.cooldown_steps, plan.seconds_per_step,
        )  # fmt: skip
        return plan, False
    log.info(
        "train_minutes=%g: timing %d steps after the first (compiling) one to choose the number "
        "of steps",
        minutes, MEASURE_STEPS,
    )  # fmt: skip
    return fixed_plan(config), True


def fit_schedule(total: int, warmup: int, cooldown: int) -> tuple[int, int, float]:
    """Warmup and cooldown shrunk in proportion to fit ``total`` steps, and the rate factor.

    Returns:
      ``(warmup, cooldown, rate_factor)``; unchanged (factor 1) when they fit already.
    """
    if warmup + cooldown <= total:
        return warmup, cooldown, 1.0
    both = warmup + cooldown  # integer arithmetic: no 2.9999... rounding down to 2
    new_warmup = max(1, warmup * total // both) if warmup else 0  # 0: no warmup, kept
    new_cooldown = min(max(0, total - new_warmup), -(-cooldown * total // both))
    # The paper's schedule peaks at d_model^-0.5 * warmup^-0.5: keep that peak.
    return new_warmup, new_cooldown, math.sqrt(new_warmup / warmup) if warmup else 1.0


def plan_from_speed(
    config: ml_collections.ConfigDict, *, step: int, seconds_per_step: float, elapsed_s: float
) -> Plan:
    """The plan that fits ``config.train_minutes`` (see the module doc).

    Args:
      config: the run's config (``train_minutes``, ``num_train_steps`` as the cap, warmup and
        cooldown).
      step: steps done so far.
      seconds_per_step: measured training time per step.
      elapsed_s: seconds of the budget spent so far.

    Returns:
      The plan; its ``num_train_steps`` is at least ``step`` (a spent budget ends the run now).
    """
    minutes = config.train_minutes
    left_s = 60.0 * minutes - elapsed_s
    more = math.floor(max(left_s, 0.0) / (seconds_per_step * (1.0 + OVERHEAD_SHARE)))
    measured = dict(train_minutes=float(minutes), seconds_per_step=float(seconds_per_step))
    if step + more >= config.num_train_steps:  # the cap: the run the config describes
        return dataclasses.replace(fixed_plan(config), **measured)
    total = max(step, step + more)
    warmup, cooldown, factor = fit_schedule(
        total, config.warmup_steps, config.get("cooldown_steps", 0)
    )
    return Plan(total, warmup, cooldown, factor, **measured)


def replan_step(plan: Plan, first_step: int) -> int | None:
    """The step of the second look for a plan chosen at ``first_step``, or None when the run
    takes none (no budget, or the warmup or the cooldown would span it)."""
    if not plan.train_minutes or plan.replanned_at:
        return None
    step = first_step + math.ceil(REPLAN_SHARE * (plan.num_train_steps - first_step))
    if step < plan.warmup_steps or step > plan.num_train_steps - plan.cooldown_steps:
        return None
    return step


def replan(
    plan: Plan,
    config: ml_collections.ConfigDict,
    *,
    step: int,
    seconds_per_step: float,
    elapsed_s: float,
    final_eval_s: float,
) -> Plan:
    """The second look: the last step that fits the budget at the rate of the run so far.

    Args:
      plan: the plan chosen from the first steps.
      config: the run's config (``num_train_steps`` stays the cap).
      step: steps done so far (``replan_step``).
      seconds_per_step: wall-clock seconds per step since the first look, evaluations and
        checkpoints included.
      elapsed_s: seconds of the budget spent so far.
      final_eval_s: the time kept for the final evaluation (the last one's).

    Returns:
      ``plan`` with a new ``num_train_steps`` (warmup, cooldown and rate factor unchanged): at
      least ``step + plan.cooldown_steps``, so the cooldown runs whole.
    """
    left_s = 60.0 * plan.train_minutes - elapsed_s - final_eval_s
    fits = step + math.floor(max(left_s, 0.0) / seconds_per_step)
    total = min(max(fits, step + plan.cooldown_steps), config.num_train_steps)
    if total > fits:
        log.warning(
            "train_minutes=%g: %d more steps fit, but the cooldown takes %d: the run will "
            "overrun its budget",
            plan.train_minutes, fits - step, plan.cooldown_steps,
        )  # fmt: skip
    return dataclasses.replace(
        plan, num_train_steps=total, seconds_per_step=float(seconds_per_step), replanned_at=step
    )


def describe(plan: Plan, config: ml_collections.ConfigDict, *, step: int, elapsed_s: float) -> str:
    """One log line saying what was chosen and why."""
    cap = " (the num_train_steps cap)" if plan.num_train_steps == config.num_train_steps else ""
    text = (
        f"train_minutes={plan.train_minutes:g}: {plan.seconds_per_step:.3f} s/step measured, "
        f"{elapsed_s / 60:.1f} min spent by step {step}: training to step "
        f"{plan.num_train_steps}{cap}, {OVERHEAD_SHARE:.0%} of the time left kept for "
        "evaluations and checkpoints"
    )
    warmup, cooldown = config.warmup_steps, config.get("cooldown_steps", 0)
    if (plan.warmup_steps, plan.cooldown_steps) != (warmup, cooldown):
        text += (
            f"; warmup {warmup} -> {plan.warmup_steps} and cooldown {cooldown} -> "
            f"{plan.cooldown_steps} steps to fit, rate x{plan.rate_factor:.3f} to keep the peak"
        )
    if plan.num_train_steps == step:
        text += "; the budget is spent already: stopping here"
    return text


class SpeedProbe(Window):
    """Times each step after the compiling one, without paused time; the speed is the median.

    ``add`` is called once a step has run. The median, not the mean: with the host allocator
    keeping its memory (``runtime.host_memory``), a few of the first steps stall (one took 1.0 s
    against 0.31 s in the probe model's first 40 steps), which made the mean of 20 steps 1.45x
    the steady step, and a 25-minute budget trained for 16.9 minutes (the default config, 2-core
    Intel Xeon with AMX).
    """

    def reset(self) -> float:
        self.durations, self.last = [], time.monotonic()
        return super().reset()

    def add(self, tokens: int) -> None:
        super().add(tokens)
        now = time.monotonic()
        self.durations.append(now - self.last)
        self.last = now

    @contextlib.contextmanager
    def paused(self):
        start = time.monotonic()
        with super().paused():
            yield
        self.last += time.monotonic() - start

    def seconds_per_step(self) -> float:
        return statistics.median(self.durations)

    def due(self) -> bool:
        """Whether enough steps were timed (all processes agree: they must decide together)."""
        due = self.steps >= MEASURE_STEPS or (self.steps >= 2 and self.seconds() >= MEASURE_SECONDS)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(np.any(multihost_utils.process_allgather(np.array([due], np.int32))))
        return due


def share(plan: Plan) -> Plan:
    """Process 0's plan on every process (their clocks differ; their step counts must not)."""
    if jax.process_count() == 1:
        return plan
    from jax.experimental import multihost_utils

    numbers = np.array(
        [plan.num_train_steps, plan.warmup_steps, plan.cooldown_steps, plan.rate_factor,
         plan.train_minutes, plan.seconds_per_step, plan.replanned_at],
        np.float32,  # what broadcast_one_to_all carries without x64; steps < 2^24 stay exact
    )  # fmt: skip
    n = multihost_utils.broadcast_one_to_all(numbers)
    return Plan(int(n[0]), int(n[1]), int(n[2]), float(n[3]), float(n[4]), float(n[5]), int(n[6]))
