"""Fault injection: kills, damage, signals, a bad loss and a failed write, each handled right.

    python -m bench.faults                 # 10 seeded SIGKILLs and the other faults (~4 min)
    python -m bench.faults --kills 3       # the short version CI runs (tests/test_faults.py)

Runs ``train.py --config=configs/tiny.py`` (one CPU device) as a subprocess, then:

- **SIGKILL** at ``--kills`` seeded random moments of one run, restarting it after each; one
  kill lands while a checkpoint is being written (its temporary directory exists) and one right
  after a new best checkpoint (before the next regular one). The logged losses of the run
  must equal an uninterrupted run's bit for bit.
- **a damaged latest checkpoint** (one file truncated, another garbled) is set aside and the
  one before it resumes, reproducing the same losses;
- **SIGTERM** saves a checkpoint and exits with 143;
- **a non-finite loss** (an absurd learning rate) stops naming the step; every checkpoint left
  is from before it and finite;
- **a failed checkpoint write** (simulated: ENOSPC part-way, ``bench.fault_injection``) stops
  the run; the previous checkpoint stays valid and a rerun reproduces the losses;
- **a changed optimizer** (``grad_clip_norm``) is refused with exit status 1, nothing moved.

One line per fault with its outcome, then a total; the exit status is 1 if any went wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Regular checkpoints every 4 steps, dev BLEU (greedy, 4 sentences) every 6: best/6 is written
# two steps before checkpoint 8.
SETTINGS = dict(
    checkpoint_every_steps=4, bleu_every_steps=6, eval_every_steps=0, eval_at_end=False,
    beam_size=1, eval_sentences=4, num_samples=0, log_every_steps=1, keep_checkpoints=3,
) | {
    # The `tiny` preset's own shape and schedule: faults test the machinery, and this shape
    # steps four times faster than configs/tiny.py's (sized to learn visibly).
    "model.overrides.d_model": 32, "model.overrides.d_ff": 64, "tokens_per_step": 1024,
    "lr_scale": 2.0, "warmup_steps": 10,
}  # fmt: skip


class Trainer:
    """Starts ``train.py`` runs of one configuration with a shared compilation cache."""

    def __init__(self, steps: int, cache: str):
        self.steps = steps
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "",
            "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }

    def command(self, workdir: Path, module: list[str] | None = None, **changes) -> list[str]:
        flags = {"num_train_steps": self.steps, **SETTINGS, **changes}
        args = [f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}"]
        args += [f"--config.{k}={v}" for k, v in flags.items()]
        if module:  # e.g. bench.fault_injection, which takes train.py's arguments after --
            return [sys.executable, "-m", *module, "--", *args]
        return [sys.executable, str(REPO / "train.py"), *args]

    def start(self, workdir: Path, module: list[str] | None = None, **changes):
        log = open(workdir.with_suffix(".log"), "a")  # noqa: SIM115 (closed by finish)
        proc = subprocess.Popen(
            self.command(workdir, module, **changes), cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc.log_file = log
        return proc

    def run(self, workdir: Path, module: list[str] | None = None, **changes) -> int:
        proc = self.start(workdir, module, **changes)
        return finish(proc)


def finish(proc, timeout: float = 600) -> int:
    code = proc.wait(timeout=timeout)
    proc.log_file.close()
    return code


def losses(workdir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs some steps again)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_lines(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def last_step_since(workdir: Path, lines: int) -> int:
    """The highest training step logged after the first ``lines`` lines (0 if none)."""
    path = workdir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines()[lines:] if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in row:
            steps.append(row["step"])
    return max(steps)


def log_text(workdir: Path) -> str:
    path = workdir.with_suffix(".log")
    return path.read_text(errors="replace") if path.exists() else ""


def steps_in(directory: Path) -> list[int]:
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if directory.is_dir()
        else []
    )


def half_written(workdir: Path) -> list[str]:
    """Orbax's temporary directories of checkpoints being (or never finished being) written."""
    directory = workdir / "checkpoints"
    return [p.name for p in directory.iterdir() if "tmp" in p.name] if directory.is_dir() else []


def resumed_from(text: str) -> str:
    """The step the last start of a run resumed from, from its log."""
    marks = [
        line
        for line in text.splitlines()
        if "resumed from step" in line or "initialised a new" in line
    ]
    if not marks:
        return "?"
    return marks[-1].split("resumed from step ")[-1].strip() if "resumed" in marks[-1] else "0"


def wait_for(proc, condition, timeout: float = 300, poll: float = 0.001) -> bool:
    """Polls ``condition`` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the run neither reached the moment nor ended")


def report(results: list, name: str, ok: bool, outcome: str) -> None:
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {outcome}", flush=True)


def kills(trainer: Trainer, root: Path, reference: dict, count: int, seed: int, results: list):
    """SIGKILLs one run ``count`` times (after a best checkpoint, mid-write, at random)."""
    rng = np.random.default_rng(seed)
    workdir = root / "killed"
    workdir.mkdir()
    plan = ["after a new best checkpoint", "during a checkpoint write"][:count]
    plan += ["at a random moment"] * (count - len(plan))
    for i, kind in enumerate(plan, 1):
        lines = logged_lines(workdir)  # what earlier runs logged
        proc = trainer.start(workdir)
        if kind == "after a new best checkpoint":
            seen = set(steps_in(workdir / "best"))
            hit = wait_for(proc, lambda seen=seen: set(steps_in(workdir / "best")) - seen)
            new = sorted(set(steps_in(workdir / "best")) - seen)
            detail = f"best/{new[0] if new else '?'} just written"
        elif kind == "during a checkpoint write":
            hit = wait_for(proc, lambda: half_written(workdir), poll=0.0002)
            temps = half_written(workdir)
            detail = f"{temps[0].split('.')[0]}.orbax-checkpoint-tmp-* open" if temps else ""
        else:  # a step a little past the checkpoint it resumes from, and a moment within it
            resume = max(steps_in(workdir / "checkpoints"), default=0)
            span = 2 * SETTINGS["checkpoint_every_steps"]  # past the next checkpoint at times
            target = min(resume + int(rng.integers(1, span + 1)), trainer.steps - 1)
            delay = float(rng.uniform(0, 0.4))
            reached = lambda t=target, n=lines: last_step_since(workdir, n) >= t  # noqa: E731
            hit = wait_for(proc, reached, poll=0.01)
            time.sleep(delay)
            detail = f"step {target} + {delay:.2f} s"
        proc.kill()
        finish(proc)
        left = half_written(workdir)
        if kind == "during a checkpoint write":
            hit = hit and bool(left)  # the write was really cut short
        step = last_step_since(workdir, lines)
        state = f"killed after step {step} ({detail})" if hit else "the moment never came"
        complete = steps_in(workdir / "checkpoints")
        outcome = f"{state}; complete checkpoints {complete}, half-written {len(left)}"
        report(results, f"SIGKILL {i}/{count} {kind}", hit, outcome)
    code = trainer.run(workdir)
    text, got = log_text(workdir), losses(workdir)
    bad = text.count("is damaged")
    ok = code == 0 and got == reference and not bad and not half_written(workdir)
    equal = "bitwise equal to" if got == reference else "DIFFERENT from"
    outcome = (
        f"exit {code}; all {len(got)} losses {equal} the uninterrupted run's; "
        f"{text.count('resumed from step')} resumes, {bad} damaged, "
        f"{len(half_written(workdir))} half-written left"
    )
    report(results, f"resume after {count} kills", ok, outcome)


def damaged(trainer: Trainer, root: Path, reference_dir: Path, reference: dict, results: list):
    """Truncates one file and garbles another of the newest checkpoint of a finished run."""
    workdir = root / "damaged"
    skip = shutil.ignore_patterns("metrics.jsonl", "tensorboard")
    shutil.copytree(reference_dir, workdir, ignore=skip)
    latest = steps_in(workdir / "checkpoints")[-1]
    ckpt = workdir / "checkpoints" / str(latest)
    truncated = sorted((ckpt / "params" / "d").iterdir())[0]  # the root of the arrays' index
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbled = ckpt / "opt_state" / "manifest.ocdbt"
    garbled.write_bytes(bytes(b ^ 0x5A for b in garbled.read_bytes()))
    code = trainer.run(workdir)
    got = losses(workdir)
    aside_dir = workdir / "corrupt_checkpoints"
    aside = sorted(p.name for p in aside_dir.iterdir()) if aside_dir.exists() else ["?"]
    start = resumed_from(log_text(workdir))
    same = bool(got) and all(got[s] == reference[s] for s in got)
    ok = code == 0 and aside[0].startswith(f"{latest}-") and same and start != "?"
    outcome = (
        f"checkpoint {latest} (truncated params/d/…, garbled opt_state/manifest.ocdbt) moved "
        f"to corrupt_checkpoints/{aside[0]}; resumed from step {start}; steps "
        f"{min(got, default='?')}-{max(got, default='?')} "
        f"{'bitwise equal' if same else 'DIFFERENT'}; exit {code}"
    )
    report(results, "damaged latest checkpoint", ok, outcome)


def sigterm(trainer: Trainer, root: Path, results: list):
    workdir = root / "sigterm"
    workdir.mkdir()
    proc = trainer.start(workdir)
    wait_for(proc, lambda: max(losses(workdir) or {0: 0}) >= 3, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    code = finish(proc)
    last = max(losses(workdir) or {0: 0})
    saved = steps_in(workdir / "checkpoints") or [None]
    ok = code == 143 and saved[-1] == last
    outcome = f"exit {code}; checkpoint saved at step {saved[-1]}, the last step run ({last})"
    report(results, "SIGTERM", ok, outcome)


def non_finite(trainer: Trainer, root: Path, results: list):
    """An absurd learning rate: the loss is NaN within a few steps."""
    workdir = root / "nan"
    workdir.mkdir()
    code = trainer.run(workdir, lr_scale=1e9, checkpoint_every_steps=1, bleu_every_steps=0)
    line = next((x for x in log_text(workdir).splitlines() if "training loss is" in x), "")
    bad_step = int(line.split(" at step ")[1].split(";")[0]) if line else None
    saved = steps_in(workdir / "checkpoints")
    finite = all(_finite_params(workdir, s) for s in saved)
    ok = code == 1 and bad_step is not None and bool(saved) and saved[-1] < bad_step and finite
    outcome = (
        f"exit {code}; '{line.split(' ERROR ')[-1][:44]}…'; checkpoints {saved}, all "
        f"before step {bad_step} and {'finite' if finite else 'NOT finite'}"
    )
    report(results, "non-finite loss", ok, outcome)


def _finite_params(workdir: Path, step: int) -> bool:
    code = (
        "import sys, jax, numpy as np; from workdirs import checkpoints; "
        f"p, _ = checkpoints.load_params({str(workdir)!r}, {step}); "
        "sys.exit(0 if all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p)) else 3)"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
    return done.returncode == 0


def write_failure(trainer: Trainer, root: Path, reference: dict, results: list):
    workdir = root / "full_disk"
    workdir.mkdir()
    fail_at = 2 * SETTINGS["checkpoint_every_steps"]
    code = trainer.run(workdir, module=["bench.fault_injection", f"--fail-write-at-step={fail_at}"])
    text = log_text(workdir)
    named = "No space left on device" in text and "are intact" in text
    saved = steps_in(workdir / "checkpoints")
    code2 = trainer.run(workdir)
    got = losses(workdir)
    ok = code == 1 and named and saved == [fail_at // 2] and code2 == 0 and got == reference
    outcome = (
        f"save of step {fail_at} failed (ENOSPC): exit {code}, complete checkpoints {saved}; "
        f"rerun resumed from step {resumed_from(log_text(workdir))}, exit {code2}, losses "
        f"{'bitwise equal' if got == reference else 'DIFFERENT'}"
    )
    report(results, "failed checkpoint write", ok, outcome)


def files_and_times(workdir: Path) -> list[tuple[str, int]]:
    """Every path under ``workdir`` with its modification time, but the lock file, which every
    run that holds the workdir rewrites with its PID (workdirs/lock.py)."""
    return sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.name != ".lock")


def mismatch(trainer: Trainer, root: Path, reference_dir: Path, results: list):
    workdir = root / "changed"
    shutil.copytree(reference_dir, workdir)
    before = files_and_times(workdir)
    code = trainer.run(workdir, grad_clip_norm=1.0)
    errors = [x for x in log_text(workdir).splitlines() if " ERROR " in x]
    after = files_and_times(workdir)
    named = len(errors) == 1 and "grad_clip_norm: 0.0 -> 1.0" in errors[0]
    ok = code == 1 and named and "opt_state" in errors[0] and before == after
    said = "one error line naming opt_state and grad_clip_norm" if named else "NOT NAMED"
    outcome = (
        f"exit {code}; {said}; "
        f"{'nothing moved or rewritten' if before == after else 'FILES CHANGED'}"
    )
    report(results, "changed optimizer (grad_clip_norm=1.0)", ok, outcome)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of one run (>= 2)")
    parser.add_argument("--steps", type=int, default=24, help="training steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", help="where to keep the runs (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.kills < 2 or args.steps < 12:
        parser.error("--kills must be >= 2 and --steps >= 12")
    start = time.monotonic()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="aiayn-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "jax-cache")
    trainer = Trainer(args.steps, cache)
    results: list[bool] = []
    reference_dir = root / "reference"
    reference_dir.mkdir()
    code = trainer.run(reference_dir)
    reference = losses(reference_dir)
    if code != 0 or sorted(reference) != list(range(1, args.steps + 1)):
        print(f"FAIL the uninterrupted run: exit {code}, see {reference_dir.with_suffix('.log')}")
        return 1
    print(
        f"reference: {args.steps} steps uninterrupted in {root} ({time.monotonic() - start:.0f} s)"
    )
    kills(trainer, root, reference, args.kills, args.seed, results)
    damaged(trainer, root, reference_dir, reference, results)
    sigterm(trainer, root, results)
    non_finite(trainer, root, results)
    write_failure(trainer, root, reference, results)
    mismatch(trainer, root, reference_dir, results)
    print(f"total: {sum(results)} of {len(results)} faults handled as expected "
          f"({time.monotonic() - start:.0f} s)")  # fmt: skip
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
