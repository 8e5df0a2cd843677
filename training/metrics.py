"""Where training reports go: ``metrics.jsonl``, TensorBoard events, and a progress display.

Only process 0 writes. Every row of ``metrics.jsonl`` is one JSON object with ``step`` and
``elapsed_s``; training rows add ``loss``, ``nll``, ``learning_rate``, ``grad_norm``,
``tokens_per_sec``, ``model_flops_per_sec`` ...; evaluation rows add ``dev_loss``,
``dev_ppl``, ``bleu``, ``chrf``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import jax

log = logging.getLogger("train")


class MetricsWriter:
    """Appends metric rows to ``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str | Path, total_steps: int, start_step: int = 0):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self._bar = None
        if not self.active:
            return
        workdir = Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, values: dict) -> None:
        """Records one row; floats that are not finite are written as null."""
        if not self.active:
            return
        row = {"step": int(step)}
        for key, value in values.items():
            if isinstance(value, (int, float)) or hasattr(value, "item"):
                value = float(value) if not isinstance(value, int) else value
                if isinstance(value, float) and not math.isfinite(value):
                    value = None
            row[key] = value
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def progress(self, step: int, text: str) -> None:
        """Moves the progress bar on a terminal; logs a plain line elsewhere."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        else:
            log.info("step %d/%d  %s", step, self.total_steps, text)

    def set_total(self, total_steps: int) -> None:
        """Changes the run's last step (``train_minutes`` chooses it after the first steps)."""
        self.total_steps = total_steps
        if self._bar is not None:
            self._bar.total = total_steps
            self._bar.refresh()

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()


class Stopwatch:
    """Wall-clock seconds since training (first) started, carried across resumes."""

    def __init__(self, already: float = 0.0):
        self._start = time.monotonic() - already

    def __call__(self) -> float:
        return time.monotonic() - self._start


class Window:
    """Training tokens, steps and seconds since the last log line, minus paused time."""

    def __init__(self):
        self.reset()

    def reset(self) -> float:
        """Starts a new window; returns the seconds the old one lasted."""
        now = time.monotonic()
        seconds = now - getattr(self, "start", now)
        self.start, self.tokens, self.steps = now, 0, 0
        return seconds

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def seconds(self) -> float:
        return time.monotonic() - self.start

    @contextlib.contextmanager
    def paused(self):
        start = time.monotonic()
        try:
            yield
        finally:
            self.start += time.monotonic() - start
