"""Averages the parameters of the last N checkpoints (section 6.1 of the paper).

    python -m training.average --workdir=DIR [--num=5]

The paper averages the last 5 checkpoints (written every 10 minutes) for base models and the
last 20 for big ones. The result is written to ``WORKDIR/averaged/<newest step>`` and decodes
like any other checkpoint: ``python decode.py --workdir=DIR --checkpoint=averaged ...``. It holds
the workdir's lock while it works (``workdirs.lock``), so it is refused while a run
trains there (whose checkpoints it reads, and which deletes old ones).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from workdirs import checkpoints
from workdirs import lock as workdir_lock

log = logging.getLogger("average")


def average_checkpoints(workdir: str | Path, num: int) -> tuple[int, list[int]]:
    """Writes the mean of the newest ``num`` checkpoints' parameters; returns (step, steps)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    directory = Path(workdir) / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints to average in {directory}")
    # A run training in the workdir would delete checkpoints under our feet: one at a time.
    with workdir_lock.acquire(workdir, "python -m training.average"):
        chosen = steps[-num:]
        if len(chosen) < num:
            log.warning("asked for %d checkpoints, %s has only %d", num, directory, len(chosen))
        total = None
        for step in chosen:
            params, _ = checkpoints.load_params(workdir, step)
            params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
            total = params if total is None else jax.tree.map(np.add, total, params)
        mean = jax.tree.map(lambda x: (x / len(chosen)).astype(np.float32), total)
        mngr = checkpoints.manager(workdir, "averaged", keep=3, async_save=False)
        checkpoints.save_params(mngr, chosen[-1], mean, {"averaged_steps": chosen})
        mngr.close()
    return chosen[-1], chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=5, help="how many of the newest checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        step, steps = average_checkpoints(args.workdir, args.num)
    except (FileNotFoundError, ValueError, workdir_lock.WorkdirLockError) as err:
        log.error("%s", err)
        return 1
    log.info("averaged steps %s into %s/averaged/%d", steps, args.workdir, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
