"""Two helpers of the training loop: stopping on a signal, and timing training apart from the rest.

``StopSignal`` turns SIGTERM / SIGINT into a flag the loop checks at step boundaries (so it can
save a checkpoint first); ``Window`` counts training tokens, steps and seconds between log lines
without the time spent evaluating or saving.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("train")


class StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can save and exit at a step boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def restore(self) -> None:
        """Reinstates the previous handlers (train_and_evaluate may be a library call)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)

    def agreed(self) -> bool:
        """Whether any process was signalled (all processes stop at the same step)."""
        flag = np.array([self.signum is not None], np.int32)
        if jax.process_count() > 1:
            flag = multihost_utils.process_allgather(flag)
        return bool(np.any(flag))


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
