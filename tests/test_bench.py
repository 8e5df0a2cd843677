"""The MFU benchmark runs end to end (on the simulated CPU devices) and reads its peaks right."""

import re
import sys
import types

import numpy as np

from bench import mfu
from bench.results import RESULTS, results_dir
from model.layers import sinusoidal_positions


def test_mfu_bench_reports_positive_utilisation(capsys, monkeypatch):
    argv = "mfu --preset tiny --vocab 300 --rows 8 --length 16 --steps 1 --repeats 1 --matmul_n 256"
    monkeypatch.setattr(sys, "argv", argv.split())
    mfu.main()
    out = capsys.readouterr().out
    assert "tiny" in out and "256 tokens per step" in out  # 2 sides x 8 rows x 16 tokens
    share = re.search(r"MFU vs measured .*: ([0-9.]+)%", out)
    assert share and float(share.group(1)) > 0, out


def test_datasheet_peaks():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert mfu.datasheet_peak(device("NVIDIA H100 80GB HBM3")) == 989.0
    assert mfu.datasheet_peak(device("NVIDIA H100 PCIe")) == 756.0
    assert mfu.datasheet_peak(device("NVIDIA H200")) == 989.0
    assert mfu.datasheet_peak(device("TPU v5 lite")) == 197.0
    assert mfu.datasheet_peak(device("cpu")) is None


def test_train_speed_names_the_machine_cpu_and_flags(monkeypatch):
    from bench import train_speed

    xeon = ("Intel(R) Xeon(R) Platinum 8480+", frozenset({"avx2", "avx512f", "amx_bf16"}))
    monkeypatch.setattr(train_speed, "cpu_info", lambda: xeon)
    line = train_speed.machine_line()
    assert line.startswith("machine: Intel(R) Xeon(R) Platinum 8480+, ")
    assert "flags avx2:yes avx512f:yes avx512_bf16:no amx_bf16:yes amx_tile:no;" in line
    assert "cpu x8" in line and line.endswith("dtype=auto -> bfloat16")  # the tests run on CPU


def test_compile_memory_bench_tables_every_setting(capsys):
    from bench import compile_memory

    assert results_dir() != RESULTS  # tests/conftest.py points the benchmarks elsewhere
    compile_memory.main("--presets tiny --vocab 300 --rows 4 --length 16 --dtype float32".split())
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == len(compile_memory.VARIANTS)
    temps = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[5]) >= float(cells[4]) > 0
        temps[(cells[1], cells[2])] = float(cells[4])
    # Keeping fewer activations needs no more temporary memory.
    assert temps[("True", "full")] <= temps[("True", "none")]
    # The same table is the latest result, in the results directory (the tests' own).
    written = (results_dir() / "compile_memory.md").read_text()
    assert all(row in written for row in rows), written
    assert "- command: `python -m bench.compile_memory --presets tiny --vocab 300" in written


def test_the_torch_probe_drops_where_the_flax_probe_drops():
    import torch

    from bench import torch_probe, train_speed

    net = torch_probe.build(32, 4, 64, 2, 50, 16)
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    # The embeddings' dropout, then 2 per encoder layer and 3 per decoder layer (residuals).
    assert drops == [0.1] * (1 + 2 * 2 + 3 * 2)
    attentions = [m for m in net.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attentions) == 2 + 2 * 2 and all(a.dropout == 0.0 for a in attentions)
    # Post-LN, one LayerNorm per sub-layer and none after either stack, as in the Flax probe.
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in net.modules()) == 2 * 2 + 3 * 2
    np.testing.assert_array_equal(net.positions.numpy(), sinusoidal_positions(16, 32))
    src = torch.randint(4, 50, (2, 16))
    net.eval()  # no dropout: the same sentence gives the same logits, position by position
    logits = net(src, src)
    assert logits.shape == (2, 16, 50) and torch.isfinite(logits).all()
    assert train_speed.default_dtypes()[0] == "float32"
