"""``StopSignal`` turns SIGTERM / SIGINT into a flag the training loop checks at step boundaries,
so it can save a checkpoint before it stops; all processes stop at the same step."""

from __future__ import annotations

import logging
import signal

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
