"""Packs tokenized examples into fixed-length rows, one epoch plan at a time, as a grain dataset.

Why not grain's `FirstFitPackIterDataset`: it works, but it moves every example through
grain's per-element machinery and packs it with several small numpy calls; on this project's
CPU that tops out near 0.3M tokens/s (`python -m bench.input_pipeline --compare-grain`), too
little headroom over one accelerator. Here each epoch is planned at once (a seeded permutation,
then best-fit into a window of open rows; about 13 us per example, so 0.4 s for the default
corpus and some 15 s per million examples, once per epoch), and each batch is assembled
with a handful of vectorized gathers, so batches come at millions of tokens/s and the state is
two integers: `{'epoch', 'batch'}`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from data.errors import DataError

log = logging.getLogger(__name__)

FEATURES = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Where every example of one epoch goes, sorted by destination row.

    Attributes:
        example: [M] example ids, ordered by `row`.
        row: [M] destination row, 0 .. num_batches * rows - 1 (batch b holds rows
            b * rows .. (b + 1) * rows - 1).
        segment: [M] 1-based index of the example within its row.
        start: Per feature, [M] offset of the example within its row.
        batch_bounds: [num_batches + 1] slice bounds into the arrays above, per batch.
        efficiency: Non-padding fraction of the kept rows (both features).
        dropped: Examples in the rows left over after the last full batch (random per epoch).
    """

    example: np.ndarray
    row: np.ndarray
    segment: np.ndarray
    start: dict[str, np.ndarray]
    batch_bounds: np.ndarray
    efficiency: float
    dropped: int

    @property
    def num_batches(self) -> int:
        return len(self.batch_bounds) - 1


def best_fit(
    lengths: dict[str, np.ndarray], row_length: int, open_rows: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Best-fit packing of examples, in the given order, into rows of `row_length` per feature.

    Each example goes to the open row it leaves the least room in (both features must fit);
    when none fits, the fullest open row is closed and a new one opened. A window of
    `open_rows` rows keeps the cost per example constant.

    Args:
        lengths: Per feature, [N] lengths (each <= row_length), in packing order.
        row_length: Row length.
        open_rows: Number of rows being filled at once.

    Returns:
        `row` [N] (rows numbered 0.. in opening order, none empty), `segment` [N] (1-based
        within the row) and per feature `start` [N] offsets.
    """
    a_len, b_len = (lengths[k] for k in FEATURES)
    n = len(a_len)
    k_open = max(1, min(open_rows, n))
    free_a = np.full(k_open, row_length, dtype=np.int64)
    free_b = np.full(k_open, row_length, dtype=np.int64)
    slot_row = np.arange(k_open)
    slot_count = np.zeros(k_open, dtype=np.int64)
    next_row = k_open
    row = np.empty(n, dtype=np.int64)
    segment = np.empty(n, dtype=np.int64)
    start_a = np.empty(n, dtype=np.int64)
    start_b = np.empty(n, dtype=np.int64)
    unfit = 2 * row_length + 1
    for j in range(n):
        a, b = a_len[j], b_len[j]
        left_a, left_b = free_a - a, free_b - b
        room = np.where((left_a >= 0) & (left_b >= 0), left_a + left_b, unfit)
        s = int(room.argmin())
        if room[s] == unfit:
            s = int((free_a + free_b).argmin())
            slot_row[s], next_row = next_row, next_row + 1
            free_a[s] = free_b[s] = row_length
            slot_count[s] = 0
        row[j] = slot_row[s]
        slot_count[s] += 1
        segment[j] = slot_count[s]
        start_a[j], start_b[j] = row_length - free_a[s], row_length - free_b[s]
        free_a[s] -= a
        free_b[s] -= b
    # Slots never used (fewer examples than slots) leave gaps in the numbering.
    _, row = np.unique(row, return_inverse=True)
    return row, segment, dict(zip(FEATURES, (start_a, start_b), strict=True))


def plan_epoch(
    lengths: dict[str, np.ndarray],
    *,
    row_length: int,
    rows: int,
    seed: int,
    epoch: int,
    open_rows: int,
) -> EpochPlan:
    """Shuffles, packs and batches one epoch; a pure function of its arguments.

    Args:
        lengths: Per feature, [N] example lengths.
        row_length: Row length.
        rows: Rows per batch.
        seed: Run seed.
        epoch: Epoch number; each epoch gets its own order.
        open_rows: See `best_fit`.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths["inputs"]))
    row, segment, start = best_fit({k: v[order] for k, v in lengths.items()}, row_length, open_rows)
    num_rows = int(row.max()) + 1
    # Rows are numbered in opening order and the last ones are part-filled: shuffle them so
    # each batch is a random mix and the rows left over after the last full batch are random.
    row = rng.permutation(num_rows)[row]
    num_batches = num_rows // rows
    kept_rows = num_batches * rows
    by_row = np.argsort(row, kind="stable")
    row, segment, order = row[by_row], segment[by_row], order[by_row]
    start = {k: v[by_row] for k, v in start.items()}
    kept = int(np.searchsorted(row, kept_rows))
    tokens = sum(int(lengths[k][order[:kept]].sum()) for k in FEATURES)
    return EpochPlan(
        example=order[:kept],
        row=row[:kept],
        segment=segment[:kept],
        start={k: v[:kept] for k, v in start.items()},
        batch_bounds=np.searchsorted(row[:kept], np.arange(num_batches + 1) * rows),
        efficiency=tokens / max(1, 2 * kept_rows * row_length),
        dropped=len(order) - kept,
    )


def assemble(
    examples: Any, plan: EpochPlan, batch: int, *, rows: int, row_length: int
) -> dict[str, np.ndarray]:
    """Builds batch `batch` of `plan` with vectorized gathers.

    Args:
        examples: A `TokenizedPairs` (flat `ids` and `offsets` per feature).
        plan: The epoch's plan.
        batch: Batch number within the epoch.
        rows: Rows per batch.
        row_length: Row length.

    Returns:
        [rows, row_length] int32 arrays `inputs`, `inputs_segmentation`, `inputs_position`,
        `targets`, `targets_segmentation`, `targets_position`.
    """
    lo, hi = plan.batch_bounds[batch], plan.batch_bounds[batch + 1]
    ex = plan.example[lo:hi]
    row_base = (plan.row[lo:hi] - batch * rows) * row_length
    out = {}
    for k in FEATURES:
        offsets = examples.offsets[k]
        n = (offsets[ex + 1] - offsets[ex]).astype(np.int64)
        # Position of each token within its example: 0..n-1, for all examples at once.
        first = np.cumsum(n) - n
        pos = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n)
        dst = np.repeat(row_base + plan.start[k][lo:hi], n) + pos
        values = np.zeros(rows * row_length, dtype=np.int32)
        values[dst] = examples.ids[k][np.repeat(offsets[ex], n) + pos]
        seg = np.zeros(rows * row_length, dtype=np.int32)
        seg[dst] = np.repeat(plan.segment[lo:hi], n)
        position = np.zeros(rows * row_length, dtype=np.int32)
        position[dst] = pos
        out[k] = values.reshape(rows, row_length)
        out[f"{k}_segmentation"] = seg.reshape(rows, row_length)
        out[f"{k}_position"] = position.reshape(rows, row_length)
    return out


class PackedBatches(grain.IterDataset):
    """Shuffled, packed, batched epochs of tokenized examples.

    Args:
        examples: A `TokenizedPairs`; every example must fit in `row_length`.
        row_length: Row length.
        rows: Rows per batch.
        seed: Seed of the per-epoch shuffles.
        num_epochs: Number of epochs; None for endless.
        open_rows: Rows filled at once by best-fit packing (more: tighter, slower to plan).
    """

    def __init__(
        self,
        examples: Any,
        *,
        row_length: int,
        rows: int,
        seed: int,
        num_epochs: int | None = None,
        open_rows: int = 128,
    ):
        super().__init__()
        if len(examples) == 0:
            raise DataError("PackedBatches needs at least one example")
        self.examples = examples
        self.row_length, self.rows, self.seed = row_length, rows, seed
        self.num_epochs, self.open_rows = num_epochs, open_rows
        self.lengths = {k: np.diff(examples.offsets[k]) for k in FEATURES}

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.lengths,
            row_length=self.row_length,
            rows=self.rows,
            seed=self.seed,
            epoch=epoch,
            open_rows=self.open_rows,
        )

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self)

    def __str__(self) -> str:
        return f"PackedBatches(row_length={self.row_length}, rows={self.rows}, seed={self.seed})"


class PackedBatchIterator(grain.DatasetIterator):
    """Iterator over `PackedBatches`; its state is `{'epoch': e, 'batch': b}` (next to yield)."""

    def __init__(self, dataset: PackedBatches):
        super().__init__()
        self._ds = dataset
        self._epoch, self._batch = 0, 0
        self._plan: EpochPlan | None = None

    def _current_plan(self) -> EpochPlan:
        if self._plan is None:
            self._plan = self._ds.plan(self._epoch)
            log.info(
                "epoch %d: %d batches of %d rows, packing efficiency %.3f, %d examples left "
                "over for lack of a full batch",
                self._epoch,
                self._plan.num_batches,
                self._ds.rows,
                self._plan.efficiency,
                self._plan.dropped,
            )
            if self._plan.num_batches == 0:
                raise DataError(
                    f"{len(self._ds.examples)} examples fill fewer than one batch of "
                    f"{self._ds.rows} rows of {self._ds.row_length}; use fewer rows per step"
                )
        return self._plan

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        if ds.num_epochs is not None and self._epoch >= ds.num_epochs:
            raise StopIteration
        plan = self._current_plan()
        if self._batch >= plan.num_batches:
            raise DataError(
                f"iterator state {self.get_state()} is past the {plan.num_batches} batches of "
                "that epoch; was it saved with other data, rows or row_length?"
            )
        batch = assemble(ds.examples, plan, self._batch, rows=ds.rows, row_length=ds.row_length)
        self._batch += 1
        if self._batch == plan.num_batches:
            self._epoch, self._batch, self._plan = self._epoch + 1, 0, None
        return batch

    @property
    def epoch_efficiency(self) -> float:
        """Packing efficiency of the current epoch's plan (both features, kept rows)."""
        return self._current_plan().efficiency

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch}

    def set_state(self, state: dict[str, Any]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch != self._epoch:
            self._plan = None
        self._epoch, self._batch = epoch, batch
