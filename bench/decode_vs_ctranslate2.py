"""Translating a file: ``decode.py`` against a CTranslate2 export of the same checkpoint.

    python -m bench.decode_vs_ctranslate2 --workdir=DIR --input=FILE [--reference=FILE] \
        [--checkpoint=latest] [--beam_size=4] [--alpha=0.6] [--stopping=exact|count] \
        [--passes=3] [--batch_tokens=0] [--ct2_threads=0] [--dtype=auto] \
        [--ct2_compute_type=float32]

Needs ``pip install -e ".[ctranslate2]"``. The checkpoint is exported (float32) to a temporary
directory, then both engines translate the whole file, passes interleaved, medians reported:

* whole run: ``python decode.py ...`` and the same job for CTranslate2 (this module with
  ``--ct2_worker``: load the export and the tokenizer, translate, write the file), each a child
  process timed from start to exit; its peak RSS is that child's own (``os.wait4``).
* compiled: in this process, the project's ``Translator.translate`` and CTranslate2's
  ``translate_batch`` (``interop.ctranslate2_run.translate``, ``intra_threads`` = the usable cores)
  on all lines, after one warm-up pass each. The project's compile time is its first pass
  minus its median pass (the same difference for CTranslate2 is its warm-up overhead).

Numerics: decode.py computes in ``--dtype`` (``auto``: a bf16-trained model decodes in bf16 on
CPUs with AMX and in float32 on other CPUs, see ``decode.py``) and CTranslate2 in
``--ct2_compute_type`` (its ``compute_type``; ``float32`` by default). ``--dtype=float32`` against
CTranslate2 float32 is the like-for-like comparison. Other pairs (bf16 against float32, or
anything against int8) trade exactness for speed in different ways, so compare their BLEU and
their share of identical outputs as well as their speed.

Each engine's passes are printed too (shared machines are noisy: judge the medians by them).

Target tokens are counted the same way for both: SentencePiece pieces of each output + EOS.
BLEU is sacreBLEU's (``decoding.scoring.score``). Search: beam ``--beam_size`` with length
penalty ``--alpha`` (greedy for 1), outputs up to source length + 50 tokens. CTranslate2's
length penalty is ``length ** alpha``, not the project's ``((5 + length) / 6) ** alpha``, and its
beam stops after ``beam_size`` finished hypotheses (decode.py's ``--stopping=count``; its
default, ``exact``, searches on until no live beam could win), so beam outputs may differ
slightly (the identical share is printed); greedy outputs are the same up to per-batch length
limits.

CTranslate2's OpenMP threads spin while they wait; on a machine shared with other jobs that
can cost it several times its speed: ``OMP_WAIT_POLICY=PASSIVE`` (inherited by the child) or
``--ct2_threads=1`` show whether that is happening.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("decode.py", "ctranslate2")
CT2_BATCH_TOKENS = 4096  # interop.ctranslate2_run.translate's default


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 file as ``decode.py`` reads them (BOM and CR dropped)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def ct2_worker(args) -> None:
    """The CTranslate2 whole run: what a user of the export runs (no JAX imported)."""
    import json

    import ctranslate2

    from data.tokenizer import Tokenizer
    from interop.ctranslate2_run import translate

    fields = json.loads((Path(args.workdir) / "model_config.json").read_text())
    # Workdirs written before the field's rename call it max_len (model.config._RENAMED).
    max_positions = fields["max_positions"] if "max_positions" in fields else fields["max_len"]
    tokenizer = Tokenizer.load(Path(args.model) / "tokenizer.model")
    translator = ctranslate2.Translator(
        args.model, device="cpu", intra_threads=args.ct2_threads,
        compute_type=args.ct2_compute_type,
    )  # fmt: skip
    outputs = translate(
        translator, tokenizer, read_lines(args.input), max_positions=max_positions,
        beam_size=args.beam_size, alpha=args.alpha, extra_len=args.extra_len,
        batch_tokens=args.batch_tokens or CT2_BATCH_TOKENS,
    )  # fmt: skip
    Path(args.output).write_text("".join(o + "\n" for o in outputs), encoding="utf-8")


# Runs argv[2:] and writes [seconds, peak RSS in KiB, exit status] of it to argv[1]. A forked
# child's peak RSS starts at its parent's size (and survives exec), so the timed command is
# started from this small interpreter, not from the benchmark process with JAX loaded.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump([seconds, usage.ru_maxrss, proc.returncode], f)
"""


def run_child(cmd: list[str], log: Path) -> tuple[float, int]:
    """Runs ``cmd`` from the repository root; returns (seconds from start to exit, peak RSS in
    bytes of that process alone)."""
    import json

    result = log.with_suffix(".json")
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(result), *cmd],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    seconds, maxrss_kib, status = json.loads(result.read_text())
    if status:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {status}:\n{tail}")
    return seconds, maxrss_kib * 1024


def whole_run_commands(args, model_dir: Path, tmp: Path) -> dict[str, tuple[list[str], Path]]:
    search = ["--beam_size", str(args.beam_size), "--alpha", str(args.alpha),
              "--extra_len", str(args.extra_len)]  # fmt: skip
    project_out, ct2_out = tmp / "decode.out", tmp / "ctranslate2.out"
    method = ["--method=greedy"] if args.beam_size == 1 else ["--method=beam"]
    project = [
        sys.executable, "decode.py", f"--workdir={args.workdir}", f"--input={args.input}",
        f"--output={project_out}", f"--checkpoint={args.checkpoint}",
        f"--batch_tokens={args.batch_tokens}", f"--beam_size={args.beam_size}",
        f"--alpha={args.alpha}", f"--stopping={args.stopping}", f"--dtype={args.dtype}",
        *method,
    ]  # fmt: skip
    ct2 = [
        sys.executable, "-m", "bench.decode_vs_ctranslate2", "--ct2_worker",
        f"--model={model_dir}", f"--workdir={args.workdir}", f"--input={args.input}",
        f"--output={ct2_out}", f"--ct2_threads={args.ct2_threads}",
        f"--batch_tokens={args.batch_tokens or CT2_BATCH_TOKENS}",
        f"--ct2_compute_type={args.ct2_compute_type}", *search,
    ]  # fmt: skip
    return {"decode.py": (project, project_out), "ctranslate2": (ct2, ct2_out)}


def measure(args) -> dict:
    """Exports, then times both engines; returns per-engine results (see ``table``)."""
    with tempfile.TemporaryDirectory(prefix="decode_vs_ct2-") as tmp:
        return _measure(args, Path(tmp))


def _measure(args, tmp: Path) -> dict:
    import ctranslate2

    from decoding.translate import SearchConfig, Translator
    from interop.ctranslate2 import export
    from interop.ctranslate2_run import translate
    from interop.workdir_format import read_workdir
    from model import make_mesh
    from workdirs.restore import load

    sources = read_lines(args.input)
    references = read_lines(args.reference) if args.reference else None
    if references is not None and len(references) != len(sources):
        raise SystemExit(f"{args.reference} has {len(references)} lines, {args.input} has "
                         f"{len(sources)}; expected one reference per line")  # fmt: skip
    bundle = read_workdir(args.workdir, args.checkpoint)
    model_dir = export(bundle, tmp / "ct2")
    tokenizer, max_positions = bundle.tokenizer, bundle.config.max_positions
    res = {e: {"whole_s": [], "rss": [], "pass_s": []} for e in ENGINES}

    commands = whole_run_commands(args, model_dir, tmp)
    for p in range(args.passes):
        for engine, (cmd, out) in commands.items():
            seconds, rss = run_child(cmd, tmp / f"{engine}-{p}.log")
            res[engine]["whole_s"].append(seconds)
            res[engine]["rss"].append(rss)
            res[engine]["whole_outputs"] = read_lines(out)

    mesh = make_mesh()
    model, params, _ = load(args.workdir, args.checkpoint, mesh)
    method = "greedy" if args.beam_size == 1 else "beam"
    search = SearchConfig(
        method=method, beam_size=args.beam_size, alpha=args.alpha, stopping=args.stopping
    )
    project = Translator(
        model, tokenizer, search, mesh=mesh, tokens_per_batch=args.batch_tokens or None,
        dtype=args.dtype,
    )  # fmt: skip
    ct2 = ctranslate2.Translator(
        str(model_dir), device="cpu", intra_threads=args.ct2_threads,
        compute_type=args.ct2_compute_type,
    )  # fmt: skip
    run = {
        "decode.py": lambda: [nbest[0][0] for nbest in project.translate(params, sources)],
        "ctranslate2": lambda: translate(
            ct2, tokenizer, sources, max_positions=max_positions, beam_size=args.beam_size,
            alpha=args.alpha, extra_len=args.extra_len,
            batch_tokens=args.batch_tokens or CT2_BATCH_TOKENS,
        ),
    }  # fmt: skip
    for p in range(args.passes + 1):  # Pass 0 is the warm-up (and the project's compilation).
        for engine in ENGINES:
            start = time.perf_counter()
            res[engine]["outputs"] = run[engine]()
            seconds = time.perf_counter() - start
            if p == 0:
                res[engine]["first_s"] = seconds
            else:
                res[engine]["pass_s"].append(seconds)

    from decoding.scoring import score

    for engine in ENGINES:
        r = res[engine]
        r["tokens"] = sum(len(tokenizer.encode(h)) + 1 for h in r["outputs"] if h)
        r["bleu"] = score(r["outputs"], references)["bleu"] if references else None
    res["sentences"] = len(sources)
    res["stopping"] = args.stopping
    res["consistent"] = all(res[e]["whole_outputs"] == res[e]["outputs"] for e in ENGINES)
    pairs = zip(res["decode.py"]["outputs"], res["ctranslate2"]["outputs"], strict=True)
    res["identical"] = sum(a == b for a, b in pairs)
    return res


def summary(res: dict) -> dict[str, list[float | None]]:
    """Per engine and for their ratio (project / CTranslate2): sentences/s and tokens/s of the
    whole run and of a compiled pass, compile seconds, peak RSS in MiB and BLEU."""
    n = res["sentences"]
    rows = {}
    for engine in ENGINES:
        r = res[engine]
        whole, compiled = statistics.median(r["whole_s"]), statistics.median(r["pass_s"])
        rows[engine] = [
            n / whole, r["tokens"] / whole, n / compiled, r["tokens"] / compiled,
            r["first_s"] - compiled, statistics.median(r["rss"]) / 2**20, r["bleu"],
        ]  # fmt: skip
    rows["ratio"] = [
        a / b if a is not None and b else None
        for a, b in zip(rows["decode.py"], rows["ctranslate2"], strict=True)
    ]
    rows["ratio"][4] = None  # CTranslate2 compiles nothing: its warm-up overhead is not a peer.
    return rows


def table(res: dict, passes: int) -> str:
    """The printed comparison: one row per engine and their ratio (project / CTranslate2)."""
    rows = summary(res)
    header = (
        f"{'engine':<13}{'whole run':>22}{'compiled':>22}{'compile s':>11}{'peak RSS':>11}"
        f"{'BLEU':>8}\n{'':<13}{'sent/s':>11}{'tok/s':>11}{'sent/s':>11}{'tok/s':>11}"
        f"{'':>11}{'MiB':>11}"
    )
    lines = [header]
    for name, label in (("decode.py", "decode.py"), ("ctranslate2", "ctranslate2"),
                        ("ratio", "project/CT2")):  # fmt: skip
        cells = [
            "-" if v is None else (f"{v:.2f}x" if name == "ratio" else f"{v:.2f}")
            for v in rows[name]
        ]
        lines.append(f"{label:<13}" + "".join(f"{c:>11}" for c in cells[:6]) + f"{cells[6]:>8}")
    return "\n".join(lines + notes(res, passes))


def notes(res: dict, passes: int) -> list[str]:
    """The lines under the table: what its numbers are, and each engine's passes."""
    n = res["sentences"]
    lines = [
        f"{n} sentences, medians of {passes} passes, decode.py --stopping={res['stopping']}; "
        "identical outputs: "
        f"{res['identical']}/{n}; compile s for ctranslate2 is its warm-up overhead"
    ]
    # The passes themselves, so that a median taken on a noisy machine can be judged.
    for engine in ENGINES:
        r = res[engine]
        lines.append(
            f"passes, {engine}: whole run {_seconds(r['whole_s'])}; compiled "
            f"{_seconds(r['pass_s'])} (warm-up {r['first_s']:.1f} s)"
        )
    if not res["consistent"]:
        lines.append("note: an engine's whole-run output file differs from its in-process outputs")
    return lines


def markdown(res: dict, passes: int) -> str:
    """``table``'s numbers as a Markdown table, its notes as a list below it."""
    from bench.results import markdown_table  # imports JAX: not in the worker

    header = ("engine", "whole run sent/s", "whole run tok/s", "compiled sent/s",
              "compiled tok/s", "compile s", "peak RSS MiB", "BLEU")  # fmt: skip
    cells = []
    for name, label in (("decode.py", "decode.py"), ("ctranslate2", "CTranslate2"),
                        ("ratio", "decode.py / CTranslate2")):  # fmt: skip
        values = summary(res)[name]
        form = "{:.2f}x" if name == "ratio" else "{:.2f}"
        cells.append([label] + ["-" if v is None else form.format(v) for v in values])
    return markdown_table(header, cells) + "\n\n" + "\n".join(f"- {x}" for x in notes(res, passes))


def _seconds(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values) + " s"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="train.py workdir")
    parser.add_argument("--input", required=True, help="source sentences, one per line")
    parser.add_argument("--reference", help="reference translations: report BLEU")
    parser.add_argument("--checkpoint", default="latest", help="latest, best, averaged, STEP")
    # Search defaults: None here, SearchConfig's below (the worker is always told all three).
    parser.add_argument("--beam_size", type=int, help="1: greedy search")
    parser.add_argument("--alpha", type=float, help="length penalty exponent")
    parser.add_argument("--extra_len", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--stopping", default="exact",
        help="decode.py's beam stopping rule, exact or count (CTranslate2's is count)",
    )  # fmt: skip
    parser.add_argument("--passes", type=int, default=3, help="timed passes per engine")
    parser.add_argument(
        "--batch_tokens", type=int, default=0,
        help="source tokens per batch; 0: each engine's default (decode.py's for the backend, "
        f"{CT2_BATCH_TOKENS} for CTranslate2)",
    )  # fmt: skip
    parser.add_argument("--ct2_threads", type=int, default=0, help="0: the usable cores")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="decode.py's --dtype (auto: see decode.py --help)",
    )  # fmt: skip
    parser.add_argument(
        "--ct2_compute_type", default="float32",
        help="CTranslate2's compute_type: float32 (like for like), int8, int16, int8_float32, ...",
    )  # fmt: skip
    parser.add_argument("--ct2_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.ct2_worker:  # the worker must not import JAX (see ct2_worker)
        from decoding.translate import SearchConfig

        default = SearchConfig()
        for name in ("beam_size", "alpha", "extra_len"):
            if getattr(args, name) is None:
                setattr(args, name, getattr(default, name))
    args.ct2_threads = args.ct2_threads or cores()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.ct2_worker:
        ct2_worker(args)
        return
    if args.passes < 1 or args.beam_size < 1:
        raise SystemExit("--passes and --beam_size must be >= 1")
    import jax

    from bench.results import write_result

    res = measure(args)
    search = "greedy" if args.beam_size == 1 else f"beam {args.beam_size}, alpha {args.alpha}"
    described = (
        f"{args.workdir} ({args.checkpoint}), {search}; decode.py --dtype={args.dtype}; "
        f"CTranslate2 {args.ct2_compute_type} with {args.ct2_threads} threads; JAX on "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    print(f"\n{described}")
    print(table(res, args.passes))
    text = described + "\n\n" + markdown(res, args.passes)
    print(f"wrote {write_result('decode_vs_ctranslate2', text, argv=argv)}")


if __name__ == "__main__":
    main()
