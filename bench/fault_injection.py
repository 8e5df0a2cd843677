"""Faults that are hard to cause for real, simulated for ``bench.faults`` and the tests.

    python -m bench.fault_injection --fail-write-at-step=4 -- --config=configs/tiny.py ...

runs ``train.py`` with the arguments after ``--``, but the checkpoint save of the given step
fails part-way with ``OSError(ENOSPC)``, as on a full disk: the arrays are written, then the
write of the checkpoint's ``meta`` item fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import sys
from collections.abc import Iterator

import orbax.checkpoint as ocp


@contextlib.contextmanager
def fail_checkpoint_writes(step: int) -> Iterator[None]:
    """While active, writing the ``meta`` item of regular checkpoint ``step`` fails."""
    handler = ocp.JsonCheckpointHandler
    real = handler._save_fn

    async def failing(self, item, directory):
        # Regular checkpoints' meta has best_bleu; best/averaged ones' does not.
        if isinstance(item, dict) and item.get("step") == step and "best_bleu" in item:
            # The items are written concurrently: let the arrays finish first, as documented,
            # so that Orbax's clean-up does not race a write still in flight and report that
            # ("Directory not empty") instead of the full disk.
            await asyncio.sleep(1.0)
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, item, directory)

    handler._save_fn = failing
    try:
        yield
    finally:
        handler._save_fn = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-write-at-step", type=int, required=True)
    parser.add_argument("train_args", nargs="*", help="train.py's arguments, after --")
    args = parser.parse_args()
    import cli
    import train

    sys.argv = ["train.py", *args.train_args]  # train.py's own entry point reads them
    with fail_checkpoint_writes(args.fail_write_at_step):
        cli.run(train.main, train.define_flags, "train", train.ERRORS)


if __name__ == "__main__":
    sys.exit(main())
