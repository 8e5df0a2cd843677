"""Pictures of the Transformer: positional encodings, attention heads, the learning-rate schedule
and training curves.

Every function returns a ``matplotlib.figure.Figure`` (and saves it when given ``out``). Figures
are built with matplotlib's object-oriented API and rendered by the Agg canvas, so they need no
display and never touch pyplot's global state; in Jupyter, ``display(fig)`` shows them inline.

    python plots.py curves --workdir=runs/default --out=curves.png
    python plots.py positions --num_positions=100 --d_model=512 --out=positions.png
    python plots.py schedule --d_model=512 --warmup=4000 --steps=20000 --out=schedule.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from model.layers import sinusoidal_positions

_TITLES = {
    "encoder_self": "encoder self-attention",
    "decoder_self": "decoder masked self-attention",
    "decoder_cross": "encoder-decoder attention",
}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig


def positional_encoding(
    num_positions: int, d_model: int, layout: str = "interleaved", out: str | Path | None = None
) -> Figure:
    """Heatmap of the sinusoidal positional encodings, positions down, dimensions across.

    Args:
      num_positions: number of positions (rows).
      d_model: encoding width (columns).
      layout: "interleaved" (the paper: sin on even, cos on odd dimensions) or "concat".
      out: optional file to save the figure to.

    Returns:
      A figure with the heatmap and its colour bar (two axes).
    """
    pe = sinusoidal_positions(num_positions, d_model, layout)
    fig = _new_figure(9, 5)
    ax = fig.add_subplot()
    image = ax.imshow(pe, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("dimension")
    ax.set_ylabel("position")
    ax.set_title(f"sinusoidal positional encoding ({layout}), {num_positions} x {d_model}")
    fig.colorbar(image, ax=ax, label="value")
    return _finish(fig, out)


def attention_heads(
    weights,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    title: str = "",
    out: str | Path | None = None,
    *,
    ylabel: str = "query",
    xlabel: str = "key",
) -> Figure:
    """A grid of per-head attention heatmaps, with tokens on both axes.

    Args:
      weights: ``[H, T, S]`` attention probabilities (rows: queries, columns: keys).
      query_tokens: T labels for the rows.
      key_tokens: S labels for the columns.
      title: the figure's title.
      out: optional file to save the figure to.
      ylabel, xlabel: axis names.

    Returns:
      A figure with H heatmaps and one shared colour bar (H + 1 axes).
    """
    weights = np.asarray(weights, dtype=np.float32)
    heads, t, s = weights.shape
    if (len(query_tokens), len(key_tokens)) != (t, s):
        raise ValueError(
            f"weights are [H={heads}, T={t}, S={s}] but got {len(query_tokens)} query and "
            f"{len(key_tokens)} key tokens"
        )
    # Panels are sized by their token counts (0.2 inch a token) so that every label stays
    # legible; long sentences get fewer columns so the figure stays under about 30 inches wide.
    width, height = max(2.5, 0.2 * s + 1.0), max(2.5, 0.2 * t + 1.0)
    cols = max(1, min(heads, 4, int(30 // width)))
    rows = math.ceil(heads / cols)
    fig = _new_figure(cols * width + 1.2, rows * height + 1.0)
    # One colour scale for all heads, so that heads can be compared with each other.
    vmax = float(weights.max()) if weights.size else 1.0
    image = None
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=vmax or 1.0, aspect="auto")
        ax.set_xticks(range(s), labels=list(key_tokens), rotation=90, fontsize=7)
        ax.set_yticks(range(t), labels=list(query_tokens), fontsize=7)
        ax.set_title(f"head {h}", fontsize=9)
        if h % cols == 0:
            ax.set_ylabel(ylabel)
        if h >= heads - cols:
            ax.set_xlabel(xlabel)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention weight")
    if title:
        fig.suptitle(title)
    return _finish(fig, out)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The SentencePiece pieces of ``ids`` ("▁" marks the start of a word)."""
    # The project's Tokenizer wraps a SentencePieceProcessor; pieces are only needed here.
    return [tokenizer.id_to_piece(i) for i in ids]


def attention_for_sentence(
    model,
    params,
    tokenizer,
    source: str,
    target: str | None = None,
    *,
    layer: int = -1,
) -> dict[str, Figure]:
    """Attention heatmaps of one sentence pair for one layer, with tokens on the axes.

    The model reads the source (its ids plus EOS) and, teacher-forced, the target (decoder
    input: BOS plus the target's ids); the attention probabilities of every head are plotted.

    Args:
      model: the Transformer.
      params: its parameters.
      tokenizer: the project's Tokenizer.
      source: the source sentence.
      target: its translation; None translates ``source`` greedily first.
      layer: which encoder/decoder layer to show (default: the last).

    Returns:
      ``{'encoder_self', 'decoder_self', 'decoder_cross'}`` figures (source x source, target
      prefix x target prefix, output token x source).
    """
    from model import attention_maps, shift_right

    if target is None:
        from decoding.translate import SearchConfig, Translator

        translator = Translator(model, tokenizer, SearchConfig(method="greedy"))
        target = translator.translate(params, [source])[0][0][0]
    num_positions = model.config.max_positions
    src_ids = tokenizer.encode(source)[: num_positions - 1] + [tokenizer.eos_id]
    tgt_ids = tokenizer.encode(target, side="target")[: num_positions - 1] + [tokenizer.eos_id]
    src = np.asarray([src_ids], np.int32)
    labels = np.asarray([tgt_ids], np.int32)
    decoder_input = np.asarray(shift_right(labels, tokenizer.bos_id))
    maps = attention_maps(model, {"params": params}, src, decoder_input)

    src_tokens = token_pieces(tokenizer, src_ids)
    input_tokens = token_pieces(tokenizer, decoder_input[0])
    # Row i of the decoder predicts output token i, so cross-attention rows are named by it.
    output_tokens = token_pieces(tokenizer, tgt_ids)
    num_layers = maps["encoder_self"].shape[0]
    shown = layer % num_layers
    axes = {
        "encoder_self": (src_tokens, src_tokens, "query (source)", "key (source)"),
        "decoder_self": (input_tokens, input_tokens, "query (decoder input)", "key"),
        "decoder_cross": (output_tokens, src_tokens, "output token predicted", "source"),
    }
    figures = {}
    for kind, (queries, keys, ylabel, xlabel) in axes.items():
        weights = np.asarray(maps[kind][layer, 0])
        title = f"{_TITLES[kind]}, layer {shown + 1} of {num_layers}\n{source!r} -> {target!r}"
        figures[kind] = attention_heads(weights, queries, keys, title, ylabel=ylabel, xlabel=xlabel)
    return figures


def save_attention(figures: dict[str, Figure], out: str | Path) -> list[Path]:
    """Writes ``attention_for_sentence``'s figures next to each other.

    Encoder-decoder attention goes to ``out`` itself; encoder and decoder self-attention to
    ``OUT-encoder.png`` and ``OUT-decoder.png``.

    Returns:
      The paths written.
    """
    out = Path(out)
    paths = {
        "decoder_cross": out,
        "encoder_self": out.with_name(f"{out.stem}-encoder{out.suffix or '.png'}"),
        "decoder_self": out.with_name(f"{out.stem}-decoder{out.suffix or '.png'}"),
    }
    for kind, path in paths.items():
        _finish(figures[kind], path)
    return list(paths.values())


def learning_rate(
    d_model: int,
    warmup_steps: int,
    steps: int,
    scale: float = 1.0,
    out: str | Path | None = None,
) -> Figure:
    """The paper's schedule: ``scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``.

    Args:
      d_model: model width.
      warmup_steps: steps of linear warm-up before the inverse square-root decay.
      steps: how many steps to draw.
      scale: the config's ``lr_scale``.
      out: optional file to save the figure to.

    Returns:
      A figure with one axes.
    """
    from training.state import learning_rate_schedule

    schedule = learning_rate_schedule(d_model, warmup_steps, scale)
    counts = np.arange(steps)
    rates = np.asarray(schedule(counts))
    fig = _new_figure(7, 4)
    ax = fig.add_subplot()
    ax.plot(counts + 1, rates, label=f"d_model={d_model}, warmup={warmup_steps}, scale={scale:g}")
    ax.axvline(warmup_steps, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule (section 5.3)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(fig, out)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (or of ``WORKDIR/metrics.jsonl`` given a workdir)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path} (has training started?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` for the rows holding ``key``; a step logged twice (resumed run) counts once."""
    points = {}
    for row in rows:
        if row.get(key) is not None and row.get(x) is not None:
            points[row["step"]] = (row[x], row[key])
    pairs = [points[s] for s in sorted(points)]
    return np.asarray([p[0] for p in pairs], float), np.asarray([p[1] for p in pairs], float)


def training_curves(metrics_jsonl_path: str | Path, out: str | Path | None = None) -> Figure:
    """Training and dev loss against steps; dev BLEU against steps and against minutes.

    Args:
      metrics_jsonl_path: a ``metrics.jsonl`` written by train.py, or its workdir.
      out: optional file to save the figure to.

    Returns:
      A figure with three axes.
    """
    rows = read_metrics(metrics_jsonl_path)
    fig = _new_figure(15, 4.2)
    loss_ax, bleu_ax, time_ax = fig.subplots(1, 3)
    loss_ax.plot(*_series(rows, "loss"), label="training loss")
    loss_ax.plot(*_series(rows, "dev_loss"), "o-", label="dev loss")
    loss_ax.set(xlabel="step", ylabel="label-smoothed cross-entropy", title="loss")
    loss_ax.legend()
    steps, bleu = _series(rows, "bleu")
    seconds, _ = _series(rows, "bleu", x="elapsed_s")
    bleu_ax.plot(steps, bleu, "o-", color="tab:green")
    bleu_ax.set(xlabel="step", ylabel="BLEU", title="dev BLEU by step")
    time_ax.plot(seconds / 60, bleu, "o-", color="tab:green")
    time_ax.set(xlabel="training minutes", ylabel="BLEU", title="dev BLEU by time")
    for ax in (bleu_ax, time_ax):
        if not len(bleu):
            ax.text(0.5, 0.5, "no BLEU evaluation yet", ha="center", transform=ax.transAxes)
    for ax in (loss_ax, bleu_ax, time_ax):
        ax.grid(alpha=0.3)
    return _finish(fig, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("curves", help="loss, dev loss and BLEU of a training run")
    curves.add_argument("--workdir", required=True, help="training workdir (or metrics.jsonl)")
    positions = commands.add_parser("positions", help="the positional-encoding matrix")
    positions.add_argument("--num_positions", type=int, default=100)
    positions.add_argument("--d_model", type=int, default=512)
    positions.add_argument("--layout", choices=["interleaved", "concat"], default="interleaved")
    schedule = commands.add_parser("schedule", help="the learning-rate schedule")
    schedule.add_argument("--d_model", type=int, default=512)
    schedule.add_argument("--warmup", type=int, default=4000)
    schedule.add_argument("--steps", type=int, default=100_000)
    schedule.add_argument("--scale", type=float, default=1.0)
    for sub in (curves, positions, schedule):
        sub.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    if args.command == "curves":
        try:
            training_curves(args.workdir, args.out)
        except FileNotFoundError as err:
            parser.exit(1, f"error: {err}\n")
    elif args.command == "positions":
        positional_encoding(args.num_positions, args.d_model, args.layout, args.out)
    else:
        learning_rate(args.d_model, args.warmup, args.steps, args.scale, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
