"""plots.py: each figure has the expected axes and token labels; the command lines write PNGs."""

import json
import subprocess
import sys

import numpy as np
import pytest

import plots
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def tick_labels(axis) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


def test_positional_encoding_heatmap(tmp_path):
    out = tmp_path / "pe.png"
    fig = plots.positional_encoding(50, 64, out=out)
    heatmap, colorbar = fig.axes
    assert heatmap.images[0].get_array().shape == (50, 64)
    assert heatmap.get_xlabel() == "dimension" and heatmap.get_ylabel() == "position"
    assert is_png(out)
    concat = plots.positional_encoding(10, 8, layout="concat").axes[0].images[0].get_array()
    np.testing.assert_allclose(concat[:, 4:][0], 1.0)  # cosines of angle 0 in the second half


def test_attention_heads_grid_has_one_labelled_heatmap_per_head():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(4), size=(6, 3))  # [H=6, T=3, S=4]
    queries, keys = ["▁Dios", "▁es", "</s>"], ["▁God", "▁is", "▁love", "</s>"]
    fig = plots.attention_heads(weights, queries, keys, "a title")
    assert len(fig.axes) == 6 + 1  # the heads and one shared colour bar
    for ax in fig.axes[:6]:
        assert tick_labels(ax.xaxis) == keys and tick_labels(ax.yaxis) == queries
    assert fig.get_suptitle() == "a title"
    with pytest.raises(ValueError, match="2 query and 4 key tokens"):
        plots.attention_heads(weights, queries[:2], keys)


def test_learning_rate_curve_peaks_at_the_end_of_warmup(tmp_path):
    fig = plots.learning_rate(512, 4000, 20_000, out=tmp_path / "lr.png")
    (ax,) = fig.axes
    steps, rates = ax.lines[0].get_data()
    assert len(steps) == 20_000 and steps[0] == 1
    assert steps[np.argmax(rates)] == 4000
    np.testing.assert_allclose(rates.max(), 512**-0.5 * 4000**-0.5, rtol=1e-5)
    assert is_png(tmp_path / "lr.png")


def write_metrics(path):
    rows = [
        {"step": 10, "loss": 5.0, "learning_rate": 1e-4, "elapsed_s": 30.0},
        {"step": 20, "loss": 4.0, "learning_rate": 2e-4, "elapsed_s": 60.0},
        {"step": 20, "dev_loss": 4.5, "dev_ppl": 80.0, "elapsed_s": 62.0},
        {"step": 20, "bleu": 1.5, "chrf": 10.0, "elapsed_s": 70.0},
        {"step": 30, "loss": 3.5, "learning_rate": 3e-4, "elapsed_s": 100.0},
        {"step": 30, "loss": 3.4, "learning_rate": 3e-4, "elapsed_s": 101.0},  # resumed
        {"step": 40, "loss": None, "learning_rate": 3e-4, "elapsed_s": 130.0},  # non-finite
        {"step": 40, "dev_loss": 3.9, "dev_ppl": 50.0, "elapsed_s": 132.0},
        {"step": 40, "bleu": 4.0, "chrf": 20.0, "elapsed_s": 180.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_training_curves_from_metrics_jsonl(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    fig = plots.training_curves(tmp_path / "metrics.jsonl")
    loss_ax, bleu_ax, time_ax = fig.axes
    train_line, dev_line = loss_ax.lines
    np.testing.assert_array_equal(train_line.get_data()[0], [10, 20, 30])
    np.testing.assert_array_equal(train_line.get_data()[1], [5.0, 4.0, 3.4])
    np.testing.assert_array_equal(dev_line.get_data()[1], [4.5, 3.9])
    np.testing.assert_array_equal(bleu_ax.lines[0].get_data()[0], [20, 40])
    np.testing.assert_array_equal(bleu_ax.lines[0].get_data()[1], [1.5, 4.0])
    np.testing.assert_allclose(time_ax.lines[0].get_data()[0], [70 / 60, 3.0])
    # A workdir works as well as its metrics file.
    assert len(plots.training_curves(tmp_path).axes) == 3


def test_command_line_writes_pngs(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    commands = {
        "curves.png": ["curves", f"--workdir={tmp_path}"],
        "positions.png": ["positions", "--num_positions=40", "--d_model=32"],
        "schedule.png": ["schedule", "--d_model=512", "--warmup=4000", "--steps=10000"],
    }
    for name, args in commands.items():
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "plots.py", *args, f"--out={out}"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert is_png(out), name
    missing = subprocess.run(
        [sys.executable, "plots.py", "curves", f"--workdir={tmp_path / 'nope'}", "--out=x.png"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "no metrics file" in missing.stderr


def test_attention_for_sentence_labels_axes_with_pieces(tiny_loaded):
    model, params, tokenizer = tiny_loaded
    source, target = "God is love.", "Dios es amor."
    figures = plots.attention_for_sentence(model, params, tokenizer, source, target)
    assert set(figures) == {"encoder_self", "decoder_self", "decoder_cross"}
    heads = model.config.num_heads
    src_pieces = plots.token_pieces(tokenizer, tokenizer.encode(source)) + ["</s>"]
    tgt_pieces = plots.token_pieces(tokenizer, tokenizer.encode(target))
    expected = {  # (rows, columns)
        "encoder_self": (src_pieces, src_pieces),
        "decoder_self": (["<s>", *tgt_pieces], ["<s>", *tgt_pieces]),
        "decoder_cross": ([*tgt_pieces, "</s>"], src_pieces),
    }
    for kind, (rows, cols) in expected.items():
        fig = figures[kind]
        assert len(fig.axes) == heads + 1, kind
        for ax in fig.axes[:heads]:
            assert tick_labels(ax.yaxis) == rows and tick_labels(ax.xaxis) == cols, kind
    # Masked self-attention: nothing above the diagonal (no peeking at later target tokens).
    causal = figures["decoder_self"].axes[0].images[0].get_array()
    assert np.allclose(np.triu(causal, k=1), 0.0) and np.allclose(causal.sum(axis=1), 1.0)
    # Without a target the sentence is translated greedily first.
    translated = plots.attention_for_sentence(model, params, tokenizer, source, layer=0)
    assert "layer 1 of" in translated["decoder_cross"].get_suptitle()


def test_decode_attention_plot_flag_writes_pngs(tiny_workdir, tmp_path):
    src = tmp_path / "in.en"
    src.write_text("In the beginning God created the heavens.\nJesus wept.\n")
    out = tmp_path / "attention.png"
    result = subprocess.run(
        [sys.executable, "decode.py", f"--workdir={tiny_workdir}", f"--input={src}",
         f"--output={tmp_path / 'out.es'}", "--beam_size=2", f"--attention_plot={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (out, tmp_path / "attention-encoder.png", tmp_path / "attention-decoder.png"):
        assert is_png(path), path
    assert len((tmp_path / "out.es").read_text().splitlines()) == 2
