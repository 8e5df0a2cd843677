"""The decode.py vs CTranslate2 benchmark runs end to end on the tiny workdir."""

import pytest

pytest.importorskip("ctranslate2")

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from bench import decode_vs_ctranslate2  # noqa: E402

LEGACY = Path(__file__).parent / "fixtures" / "legacy_workdir"

SOURCES = ["Jesus wept.", "God is love.", "", "In the beginning God created the heavens."]
REFERENCES = ["Jesús lloró.", "Dios es amor.", "", "En el principio creó Dios los cielos."]


def test_benchmark_prints_both_engines_and_their_ratio(tiny_workdir, tmp_path, capsys):
    src, ref = tmp_path / "in.en", tmp_path / "ref.es"
    src.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    decode_vs_ctranslate2.main(
        [f"--workdir={tiny_workdir}", f"--input={src}", f"--reference={ref}", "--passes=1",
         "--beam_size=2", "--ct2_threads=1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    print(out)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert "beam 2, alpha 0.6; decode.py --dtype=auto; CTranslate2 float32 with 1 threads" in out
    for engine in ("decode.py", "ctranslate2", "project/CT2"):
        assert len(rows[engine]) == 7, out  # 4 speeds, compile s, peak RSS, BLEU
    assert float(rows["decode.py"][0]) > 0 and float(rows["ctranslate2"][0]) > 0
    assert float(rows["ctranslate2"][5]) > 10  # peak RSS in MiB, of the child process
    assert "4 sentences, medians of 1 passes" in out
    for engine in ("decode.py", "ctranslate2"):  # one whole run and one compiled pass each
        passes = next(line for line in out.splitlines() if line.startswith(f"passes, {engine}:"))
        assert re.fullmatch(
            rf"passes, {engine}: whole run \d+\.\d s; compiled \d+\.\d s \(warm-up \d+\.\d s\)",
            passes,
        ), passes


def test_lines_are_read_like_decode_py(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n\r\nfour\u2028still four\n".encode())
    assert decode_vs_ctranslate2.read_lines(path) == ["one", "two", "", "four\u2028still four"]


def test_both_whole_runs_get_their_engine_s_numerics(tmp_path):
    args = decode_vs_ctranslate2.parse_args(
        ["--workdir=w", "--input=in.txt", "--dtype=bfloat16", "--ct2_compute_type=int8"]
    )
    commands = decode_vs_ctranslate2.whole_run_commands(args, tmp_path / "ct2", tmp_path)
    project, ct2 = commands["decode.py"][0], commands["ctranslate2"][0]
    assert "--dtype=bfloat16" in project and not any("compute_type" in a for a in project)
    assert "--ct2_compute_type=int8" in ct2 and not any(a.startswith("--dtype") for a in ct2)
    defaults = decode_vs_ctranslate2.parse_args(["--workdir=w", "--input=in.txt"])
    assert (defaults.dtype, defaults.ct2_compute_type) == ("auto", "float32")


@pytest.mark.parametrize("compute_type", ["float32", "int8"])
def test_the_ctranslate2_worker_reads_a_workdir_from_before_the_max_len_rename(
    tmp_path, compute_type
):
    from interop.ctranslate2 import export
    from interop.workdir_format import read_workdir

    assert "max_len" in json.loads((LEGACY / "model_config.json").read_text())
    model = export(read_workdir(LEGACY, "latest"), tmp_path / "ct2")
    src, out = tmp_path / "in.en", tmp_path / "out.es"
    src.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    decode_vs_ctranslate2.main(
        ["--ct2_worker", f"--model={model}", f"--workdir={LEGACY}", f"--input={src}",
         f"--output={out}", "--ct2_threads=1", "--beam_size=2", "--alpha=0.6", "--extra_len=5",
         f"--ct2_compute_type={compute_type}"]
    )  # fmt: skip
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == len(SOURCES) + 1 and lines[-1] == "" and lines[2] == ""
