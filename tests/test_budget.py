"""--config.train_minutes: the number of steps chosen from the first steps' speed, and kept."""

import dataclasses
import json
import logging
import math
import shutil
import time

import numpy as np
import pytest

import training.loop
from tests.test_train import QUIET, tiny_config
from training import budget
from training.state import (
    OptimizerConfig,
    learning_rate_schedule,
    make_optimizer,
    schedule_horizon,
)


def test_speed_probe_takes_the_median_step_without_paused_time(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    probe = budget.SpeedProbe()
    for seconds in (0.2, 0.2, 1.2, 0.2, 0.2):  # a one-off stall among the first steps
        clock[0] += seconds
        probe.add(10)
    with probe.paused():  # an evaluation
        clock[0] += 50.0
    clock[0] += 0.2
    probe.add(10)
    assert probe.seconds_per_step() == pytest.approx(0.2)
    assert probe.seconds() == pytest.approx(2.2)
    assert (probe.steps, probe.tokens) == (6, 60)


def test_steps_fill_the_minutes_left_after_the_overhead_share():
    cfg = tiny_config(train_minutes=10.0, num_train_steps=100_000, warmup_steps=10)
    plan = budget.plan_from_speed(cfg, step=21, seconds_per_step=0.5, elapsed_s=60.0)
    expected = 21 + math.floor(540 / (0.5 * (1 + budget.OVERHEAD_SHARE)))
    assert plan.num_train_steps == expected
    assert (plan.warmup_steps, plan.cooldown_steps, plan.rate_factor) == (10, 0, 1.0)
    assert (plan.train_minutes, plan.seconds_per_step) == (10.0, 0.5)


def test_warmup_and_cooldown_shrink_in_proportion_keeping_the_peak_rate():
    # The default config's warmup 400 + cooldown 500 on a machine that fits 450 steps.
    assert budget.fit_schedule(450, 400, 500) == (200, 250, pytest.approx(math.sqrt(0.5)))
    assert budget.fit_schedule(900, 400, 500) == (400, 500, 1.0)  # they fit: unchanged
    assert budget.fit_schedule(3, 400, 0) == (3, 0, pytest.approx(math.sqrt(3 / 400)))
    assert budget.fit_schedule(100, 0, 500) == (0, 100, 1.0)  # no warmup stays none
    warmup, cooldown, factor = budget.fit_schedule(450, 400, 500)
    paper = learning_rate_schedule(256, 400, 0.5)
    peak = float(paper(warmup - 1, schedule_horizon(warmup, cooldown, 450, factor)))
    assert peak == pytest.approx(float(paper(399)), rel=1e-5)  # the configured peak


def test_the_cap_and_a_spent_budget():
    cfg = tiny_config(train_minutes=60.0, num_train_steps=500, warmup_steps=10, cooldown_steps=900)
    capped = budget.plan_from_speed(cfg, step=21, seconds_per_step=0.1, elapsed_s=0.0)
    # The run the config describes: its last step, its cooldown over the whole run.
    assert (capped.num_train_steps, capped.warmup_steps, capped.cooldown_steps) == (500, 10, 500)
    assert capped.train_minutes == 60.0  # still a budget plan: saved and kept on resume
    spent = budget.plan_from_speed(cfg, step=21, seconds_per_step=0.1, elapsed_s=3600.0)
    assert spent.num_train_steps == 21  # the budget is gone: stop at once
    assert "the budget is spent already" in budget.describe(spent, cfg, step=21, elapsed_s=3600)


def test_the_second_look_moves_only_the_end_to_fit_the_rate_so_far(caplog):
    cfg = tiny_config(train_minutes=10.0, num_train_steps=100_000)
    first = budget.Plan(1000, 100, 200, 1.0, train_minutes=10.0, seconds_per_step=0.4)
    assert budget.replan_step(first, 21) == 21 + math.ceil((1000 - 21) / 3)
    # 300 s spent, 10 s kept for the final evaluation: 290 s at 0.5 s/step, everything included.
    plan = budget.replan(
        first, cfg, step=400, seconds_per_step=0.5, elapsed_s=300.0, final_eval_s=10.0
    )
    assert plan == budget.Plan(980, 100, 200, 1.0, 10.0, 0.5, replanned_at=400)
    assert budget.replan_step(plan, 21) is None  # one second look only
    assert budget.Plan.from_dict(plan.to_dict()) == plan
    # Too little time left for the cooldown: it still runs whole, and the overrun is said.
    late = budget.replan(
        first, cfg, step=400, seconds_per_step=0.5, elapsed_s=580.0, final_eval_s=10.0
    )
    assert late.num_train_steps == 400 + 200
    assert "the cooldown takes 200: the run will overrun its budget" in caplog.text
    capped = budget.replan(
        first, tiny_config(train_minutes=10.0, num_train_steps=700), step=400,
        seconds_per_step=0.5, elapsed_s=300.0, final_eval_s=10.0,
    )  # fmt: skip
    assert capped.num_train_steps == 700


def test_no_second_look_inside_the_warmup_or_the_cooldown_or_without_a_budget():
    plan = budget.Plan(1000, 100, 200, 1.0, train_minutes=10.0, seconds_per_step=0.4)
    assert budget.replan_step(dataclasses.replace(plan, warmup_steps=400), 21) is None
    assert budget.replan_step(dataclasses.replace(plan, cooldown_steps=700), 21) is None
    assert budget.replan_step(dataclasses.replace(plan, train_minutes=0.0), 21) is None


@pytest.mark.parametrize("minutes", [-1.0, -0.01, float("nan")])
def test_a_negative_budget_is_refused_naming_the_field(minutes, tmp_path):
    cfg = tiny_config(train_minutes=minutes)
    with pytest.raises(ValueError, match=r"config.train_minutes=-?(nan|[0-9.]+) must be >= 0"):
        training.loop.train_and_evaluate(cfg, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()  # refused before any set-up


def metric_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def checkpoint_meta(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def test_train_minutes_chooses_saves_and_keeps_the_number_of_steps(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="train")
    chosen = []
    real = budget.plan_from_speed

    def spy(config, *, step, seconds_per_step, elapsed_s):
        # The real choice from the measured speed, with the set-up and compilation time (which
        # a loaded test machine stretches) not counted, so the run is short but never empty.
        plan = real(config, step=step, seconds_per_step=seconds_per_step, elapsed_s=0.0)
        chosen.append((step, plan))
        return plan

    monkeypatch.setattr(budget, "plan_from_speed", spy)
    # A cooldown far longer than the budget: warmup and cooldown must shrink to fit.
    changes = dict(train_minutes=0.04, num_train_steps=100_000, cooldown_steps=1000,
                   checkpoint_every_steps=22, keep_checkpoints=10, **QUIET)  # fmt: skip
    training.loop.train_and_evaluate(tiny_config(**changes), tmp_path)
    [(decided_at, plan)] = chosen
    assert decided_at == budget.MEASURE_STEPS + 1  # steps 2..21 timed, the compiling one not
    total = plan.num_train_steps
    assert total > 22, "the budget should fit steps beyond the measured ones"
    assert plan.seconds_per_step > 0 and plan.train_minutes == 0.04
    assert plan.warmup_steps + plan.cooldown_steps == total and plan.rate_factor < 1
    assert f"train_minutes=0.04: {plan.seconds_per_step:.3f} s/step measured" in caplog.text
    assert f"training to step {total}" in caplog.text
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    # The compiled step used the chosen schedule from the step after the choice on.
    config = tiny_config(**changes)
    _, schedule = make_optimizer(OptimizerConfig.from_config(config), 32)
    for row in rows:
        horizon = plan.horizon() if row["step"] > decided_at else None  # None: provisional
        expected = float(schedule(row["step"] - 1, horizon))
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-5), row["step"]
    # Past any warmup the paper's rate is d^-0.5 * step^-0.5 whatever the warmup, so the last
    # update's rate is the configured schedule's, times the factor, times the cooldown's 1/c.
    assert rows[-1]["learning_rate"] == pytest.approx(
        float(learning_rate_schedule(32, config.warmup_steps, config.lr_scale)(total - 1))
        * plan.rate_factor
        / plan.cooldown_steps,
        rel=1e-5,
    )
    # Saved with every checkpoint after the choice; not with earlier ones.
    assert budget.Plan.from_dict(checkpoint_meta(tmp_path, 22)["plan"]) == plan
    assert budget.Plan.from_dict(checkpoint_meta(tmp_path, total)["plan"]) == plan

    # Resume from step 22 (as after a crash): the saved number is kept, nothing is re-measured,
    # even with another budget on the command line.
    for path in (tmp_path / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > 22:
            shutil.rmtree(path)
    caplog.clear()
    training.loop.train_and_evaluate(tiny_config(**{**changes, "train_minutes": 5.0}), tmp_path)
    assert len(chosen) == 1, "a resumed run measured again"
    assert f"keeping the saved plan of {total} steps" in caplog.text
    assert "keeping them (a new --workdir measures again)" in caplog.text
    resumed = metric_rows(tmp_path)[len(rows) :]
    assert [r["step"] for r in resumed] == list(range(23, total + 1))
    np.testing.assert_allclose(
        [r["learning_rate"] for r in resumed], [r["learning_rate"] for r in rows[22:]], rtol=1e-6
    )


def test_the_second_look_sets_the_last_step_the_run_then_trains_to(tmp_path, monkeypatch):
    looks = []
    real_replan = budget.replan

    def first_look(config, *, step, seconds_per_step, elapsed_s):
        return budget.Plan(60, 2, 6, 1.0, train_minutes=config.train_minutes,
                           seconds_per_step=seconds_per_step)  # fmt: skip

    def second_look(plan, config, *, step, seconds_per_step, elapsed_s, final_eval_s):
        looks.append((step, seconds_per_step, elapsed_s, final_eval_s))
        # The real choice, with 1.1 s left at 0.1 s/step (the test machine's speed varies).
        return real_replan(
            plan, config, step=step, seconds_per_step=0.1,
            elapsed_s=60 * plan.train_minutes - 1.1, final_eval_s=0.0,
        )  # fmt: skip

    monkeypatch.setattr(budget, "plan_from_speed", first_look)
    monkeypatch.setattr(budget, "replan", second_look)
    changes = dict(train_minutes=5.0, num_train_steps=100_000, warmup_steps=2, cooldown_steps=6,
                   checkpoint_every_steps=1000, **QUIET)  # fmt: skip
    training.loop.train_and_evaluate(tiny_config(**changes), tmp_path)
    first_step = budget.MEASURE_STEPS + 1
    [(step, rate, elapsed_s, final_eval_s)] = looks
    assert step == first_step + math.ceil((60 - first_step) / 3)
    assert rate > 0 and elapsed_s > 0 and final_eval_s == 0.0  # no evaluation ran
    total = step + 11
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    saved = budget.Plan.from_dict(checkpoint_meta(tmp_path, total)["plan"])
    assert saved == budget.Plan(total, 2, 6, 1.0, 5.0, 0.1, replanned_at=step)
    # From the step after the second look on, the schedule cools down to the new last step.
    config = tiny_config(**changes)
    _, schedule = make_optimizer(OptimizerConfig.from_config(config), 32)
    for row in rows[step:]:
        expected = float(schedule(row["step"] - 1, saved.horizon()))
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-5), row["step"]
    assert rows[-1]["learning_rate"] < rows[total - 7]["learning_rate"] / 5
