"""Input-pipeline throughput on the default corpus, in tokens per second.

Run from the repository root:

    python -m bench.input_pipeline                   # row_length 128, 25k tokens per side per step
    python -m bench.input_pipeline --row-length 64 --compare-grain

It prints the one-off costs (reading, tokenizer training, tokenizing) and then the steady-state
rate of packed training batches, counted as real (non-padding) source + target tokens, over
several epochs so epoch planning is included. A training step on this project's CPU consumes
about 10-20k tokens/s, so the pipeline should be well over 10x that. No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from bench.results import markdown_table, write_result
from data.bucketed_batches import padded_batches
from data.pipeline import batch_stats, encode_pairs, rows_per_step, train_dataset
from data.sources import ParallelText
from data.tokenizer import Tokenizer, load_or_train


def corpus_dir(args: argparse.Namespace) -> Path:
    if args.corpus:
        return Path(args.corpus)
    from data import bible  # Builds the corpus (minutes) the first time, then reads the cache.

    return Path(bible.ensure_default_corpus(args.data_dir))


# (what, result) of this run, for the results file.
RESULTS: list[tuple[str, str]] = []


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{label:<34} {time.perf_counter() - start:8.2f} s")
    RESULTS.append((label, f"{time.perf_counter() - start:.2f} s"))
    return out


def measure(it, steps: int) -> tuple[float, float, int]:
    """Returns (non-pad tokens/s, mean efficiency, batches) over `steps` batches of `it`."""
    tokens, effs = 0, []
    start = time.perf_counter()
    for _ in range(steps):
        stats = batch_stats(next(it))
        tokens += stats["inputs_tokens"] + stats["targets_tokens"]
        effs.append(stats["efficiency"])
    return tokens / (time.perf_counter() - start), float(np.mean(effs)), steps


def grain_first_fit(examples, rows: int, row_length: int, seed: int) -> grain.IterDataset:
    """The same batches shape made with grain's own first-fit packer, for comparison."""
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"inputs": row_length, "targets": row_length},
        num_packing_bins=max(rows, 512),
    )

    def rename(b):
        return {f"{k}_segmentation": b[f"{k}_segment_ids"] for k in ("inputs", "targets")} | {
            k: b[k] for k in ("inputs", "targets")
        }

    return ds.batch(rows, drop_remainder=True).map(rename)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus", help="dir with {train,dev}.{en,es} (default: the default corpus)"
    )
    parser.add_argument("--data-dir", help="where to build the default corpus if needed")
    parser.add_argument("--tokenizer", help="SentencePiece model to use or create")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--row-length", "--max-len", dest="row_length", type=int, default=128)
    parser.add_argument("--tokens-per-step", type=int, default=25_000)
    parser.add_argument("--epochs", type=float, default=3.0, help="epochs to time")
    parser.add_argument("--compare-grain", action="store_true", help="also time grain FirstFit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    corpus = corpus_dir(args)
    print(f"corpus: {corpus}")
    pairs = timed("read train pairs", ParallelText, corpus / "train.en", corpus / "train.es")
    tmp = tempfile.TemporaryDirectory()
    tok_path = Path(args.tokenizer or Path(tmp.name) / "bench.model")
    tok: Tokenizer = timed(
        "tokenizer (load or train)", load_or_train, tok_path, pairs, vocab_size=args.vocab_size
    )
    rows = rows_per_step(args.tokens_per_step, args.row_length)
    _, stats = timed(
        "tokenize train (encode_pairs)", encode_pairs, pairs, tok, row_length=args.row_length
    )
    ds = timed(
        "train_dataset (tokenize + setup)",
        train_dataset,
        pairs,
        tok,
        row_length=args.row_length,
        rows=rows,
    )
    plan = timed("plan one epoch (shuffle + pack)", ds.plan, 0)
    print(
        f"\n{len(pairs)} pairs, {stats['filtered']} over row_length={args.row_length}; vocab "
        f"{tok.vocab_size}; {rows} rows x {args.row_length} per step; {plan.num_batches} steps "
        f"per epoch"
    )
    steps = max(1, int(args.epochs * plan.num_batches))
    rate, eff, n = measure(iter(ds), steps)
    per_step = eff * rows * args.row_length * 2
    print(f"packing efficiency (non-pad fraction) {eff:.3f}   (epoch plan: {plan.efficiency:.3f})")
    print(f"train batches: {rate:,.0f} tokens/s (source + target, non-pad) over {n} steps")
    print(f"  = {rate / per_step:,.1f} steps/s; one step holds {per_step:,.0f} tokens")
    print(f"  = {rate / 20_000:,.0f}x a 20k tokens/s training step, {rate / 10_000:,.0f}x 10k")
    RESULTS.extend([
        ("packing efficiency (non-pad fraction)", f"{eff:.3f} (epoch plan: {plan.efficiency:.3f})"),
        ("train batches, tokens/s (source + target, non-pad)", f"{rate:,.0f} over {n} steps"),
        ("train batches, steps/s", f"{rate / per_step:,.1f} ({per_step:,.0f} tokens per step)"),
    ])  # fmt: skip

    dev = ParallelText(corpus / "dev.en", corpus / "dev.es")
    sources = [dev[i][0] for i in range(len(dev))]
    start = time.perf_counter()
    batches = padded_batches(sources, tok, row_length=args.row_length, tokens_per_batch=4096)
    elapsed = time.perf_counter() - start
    real = sum(int(np.count_nonzero(b["inputs"])) for b in batches)
    slots = sum(b["inputs"].size for b in batches)
    print(
        f"\ndecode batches (dev, {len(sources)} sources): {elapsed:.2f} s, {len(batches)} "
        f"batches, {real / max(elapsed, 1e-9):,.0f} tokens/s, padding {1 - real / slots:.1%}"
    )
    RESULTS.append((
        f"decode batches (dev, {len(sources)} sources)",
        f"{elapsed:.2f} s, {len(batches)} batches, {real / max(elapsed, 1e-9):,.0f} tokens/s, "
        f"padding {1 - real / slots:.1%}",
    ))  # fmt: skip

    if args.compare_grain:
        examples, _ = encode_pairs(pairs, tok, row_length=args.row_length)
        g_steps = max(1, min(steps, 40))
        rate, eff, n = measure(iter(grain_first_fit(examples, rows, args.row_length, 0)), g_steps)
        print(
            f"\ngrain FirstFitPackIterDataset: {rate:,.0f} tokens/s, efficiency {eff:.3f} "
            f"over {n} steps"
        )
        RESULTS.append((
            "grain FirstFitPackIterDataset",
            f"{rate:,.0f} tokens/s, efficiency {eff:.3f} over {n} steps",
        ))  # fmt: skip
    described = (
        f"{corpus}: {len(pairs)} pairs, {stats['filtered']} over row_length={args.row_length}; "
        f"vocab {tok.vocab_size}; {rows} rows x {args.row_length} per step; "
        f"{plan.num_batches} steps per epoch"
    )
    text = described + "\n\n" + markdown_table(("what", "result"), RESULTS)
    print(f"wrote {write_result('input_pipeline', text, argv=None)}")


if __name__ == "__main__":
    main()
