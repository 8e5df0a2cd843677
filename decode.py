r"""Translates a file with a trained workdir (or, with a decoder-only LM's workdir, continues each
line): one output line per input line, in order.

    python decode.py --workdir=DIR --input=FILE|- --output=FILE|- \
        [--checkpoint=latest|best|averaged|imported|STEP] \
        [--beam_size=4 --alpha=0.6 --n_best=1] [--stopping=exact|count] \
        [--method=beam|greedy|sample --temperature=1 --top_k=0 --top_p=1 --seed=0] \
        [--batch_tokens=0] [--dtype=auto] [--reference=FILE] [--scores] \
        [--attention_plot=FILE.png]

Input is read in chunks of ``--chunk_lines`` lines; each chunk is sorted by length into
token-budget batches, translated, put back in order and written before the next chunk is read.
An empty input line gives an empty output line; an over-long one is truncated to the model's
maximum length (and counted in the log), never dropped.

An output file is written to a hidden temporary file beside it (``.NAME.XXXXXXXX.partial``)
and renamed into place only when the whole input is translated: an existing output keeps its
content until then, and its permission bits after. A failure, Ctrl-C or SIGTERM removes the
temporary file; a SIGKILL (or a power cut) can leave it, holding the lines done so far.
``--output=-`` streams to stdout. Every flag, path and value is checked before the model is
loaded (an output that is the input, a missing directory, a value out of range): a mistake is
one ERROR line and exit status 1, with nothing written. With ``--checkpoint=latest`` a damaged
newest checkpoint is skipped for the newest readable one, with a warning; nothing in the
workdir is changed.

Output format: one line per input line. With ``--n_best=N > 1`` the line holds the N
hypotheses, best first, separated by tabs. With ``--scores`` each hypothesis is preceded by its
score and a tab (``SCORE<TAB>HYP[<TAB>SCORE<TAB>HYP...]``); beam-search scores are
log-probabilities divided by the GNMT length penalty ((5 + length) / 6) ** alpha.

A decoder-only language model's workdir (``configs/lm_*.py``) continues each line instead, with
the same search flags, up to ``--max_new_tokens`` new tokens (EOS included); each output line
is the continuation alone. An encoder-only (masked LM) workdir has nothing to generate and is
refused.
"""

from __future__ import annotations

import importlib
import logging
import os
import stat
import sys
from pathlib import Path

from absl import flags

import cli
from cli.files import (
    Progress,
    check_output,
    check_readable,
    count_lines,
    output_stream,
    read_chunks,
    same_file,
)
from data import DataError
from decoding.beam_search import STOPPING
from decoding.continuation import Continuer
from decoding.scoring import score
from decoding.translate import SearchConfig, Translator
from model import make_mesh
from runtime.compilation_cache import enable_compilation_cache, exported_dir
from workdirs import checkpoints
from workdirs.checkpoint_errors import CheckpointError
from workdirs.files import read_model_config
from workdirs.restore import load

log = logging.getLogger("decode")

PLOT_INSTALL = 'pip install -e ".[plot]"'


def format_line(nbest: list[tuple[str, float]], with_scores: bool) -> str:
    """One output line: hypotheses tab-separated, each optionally preceded by its score."""
    if with_scores:
        return "\t".join(f"{s:.4f}\t{h}" for h, s in nbest)
    return "\t".join(h for h, _ in nbest)


# ---------------------------------------------------------------------------------------------
# Checks that run before the model is loaded
# ---------------------------------------------------------------------------------------------
def plot_paths(path: str) -> list[Path]:
    """The files ``--attention_plot=FILE.png`` writes (as ``plots.save_attention`` names them)."""
    out = Path(path)
    suffix = out.suffix or ".png"
    return [out, *(out.with_name(f"{out.stem}-{part}{suffix}") for part in ("encoder", "decoder"))]


def check_attention_plot(f) -> None:
    """Refuses ``--attention_plot`` without a file input, to stdout, over another file of the
    run, or without matplotlib."""
    if not f.attention_plot:
        return
    if f.attention_plot == "-":
        raise cli.UsageError("--attention_plot=-: the plots are PNG files; expected FILE.png")
    if f.input == "-":
        raise cli.UsageError("--attention_plot needs --input=FILE (it re-reads the first line)")
    for plot in plot_paths(f.attention_plot):
        for flag in ("input", "output", "reference"):
            other = getattr(f, flag)
            if other and other != "-" and same_file(plot, other):
                raise cli.UsageError(
                    f"--attention_plot={f.attention_plot} would write {plot}, the same file as "
                    f"--{flag}={other}; choose another name"
                )
    try:  # imported, not only found: a broken installation fails here, not after decoding
        importlib.import_module("matplotlib")
    except ImportError as err:
        raise cli.UsageError(
            f"--attention_plot needs matplotlib ({err}): {PLOT_INSTALL}, or leave the flag out"
        ) from None


def check_values(f) -> SearchConfig:
    """The search (``SearchConfig`` checks its own fields) and decode.py's own values."""
    if f.batch_tokens < 0:
        raise cli.UsageError(
            f"--batch_tokens={f.batch_tokens}: must be at least 0 (0: the backend's default)"
        )
    if f.chunk_lines < 1:
        raise cli.UsageError(f"--chunk_lines={f.chunk_lines}: must be at least 1")
    return SearchConfig(
        method=f.method, beam_size=f.beam_size, alpha=f.alpha, n_best=f.n_best,
        stopping=f.stopping, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
        seed=f.seed,
        **({} if f.max_new_tokens is None else {"extra_len": f.max_new_tokens}),
    )  # fmt: skip


def read_references(path: str, input_lines: int | None, input_name: str) -> list[str]:
    """The reference file's lines (read whole, before translating), one per input line."""
    references = [line for chunk in read_chunks(path, 1 << 30) for line in chunk]
    if input_lines is not None and len(references) != input_lines:
        raise DataError(
            f"--reference={path} has {len(references)} lines but {input_name} has "
            f"{input_lines}; expected one reference per input line"
        )
    return references


def main():
    f = flags.FLAGS
    if f.workdir is None:
        raise cli.UsageError("--workdir is required")
    # Everything that can be checked without the model, before loading it: a mistake is the
    # only line on stderr and nothing is written.
    search = check_values(f)
    check_readable("--input", f.input, "a text file, one sentence per line (or - for stdin)")
    if f.reference:
        if f.reference == "-" and f.input == "-":
            raise cli.UsageError("--reference=- and --input=- cannot both read stdin")
        check_readable("--reference", f.reference, "a text file, one reference per input line")
    check_output(f.output, {"--input": f.input, "--reference": f.reference})
    check_attention_plot(f)
    model_config, _ = read_model_config(Path(f.workdir))
    checkpoints.resolve(f.workdir, f.checkpoint)  # the checkpoint exists (read when loading)
    kind = model_config.architecture
    if kind == "encoder_only":
        raise ValueError(
            f"{f.workdir} holds an encoder-only (masked LM) model: there is nothing to "
            "generate; decode.py translates (encoder-decoder) or continues prompts "
            "(decoder-only)"
        )
    if kind == "decoder_only" and (f.attention_plot or f.reference):
        raise cli.UsageError("--attention_plot and --reference are for translation")
    regular = f.input != "-" and stat.S_ISREG(os.stat(f.input).st_mode)
    total = count_lines(f.input) if regular else None
    references = read_references(f.reference, total, f.input) if f.reference else None

    enable_compilation_cache()
    mesh = make_mesh()
    model, params, tokenizer = load(f.workdir, f.checkpoint, mesh)
    if kind == "decoder_only":
        continuer = Continuer(
            model, tokenizer, search, mesh=mesh, tokens_per_batch=f.batch_tokens or None,
            dtype=f.dtype, exported=exported_dir(),
        )  # fmt: skip
        translate_file(continuer.continue_lines, params, f.input, f.output, f.chunk_lines,
                       f.scores, total=total)  # fmt: skip
        return
    translator = Translator(
        model, tokenizer, search, mesh=mesh, tokens_per_batch=f.batch_tokens or None,
        dtype=f.dtype, exported=exported_dir(),
    )  # fmt: skip
    hypotheses = translate_file(
        translator.translate, params, f.input, f.output, f.chunk_lines, f.scores, total=total
    )
    translator.log_cut_sentences()
    if f.attention_plot and hypotheses:
        import plots  # matplotlib is only needed for this flag

        first = next(read_chunks(f.input, 1))[0]
        figures = plots.attention_for_sentence(model, params, tokenizer, first, hypotheses[0])
        for path in plots.save_attention(figures, f.attention_plot):
            log.info("wrote %s", path)
    if references is not None:
        if len(references) != len(hypotheses):  # stdin input: counted only now
            raise DataError(
                f"--reference={f.reference} has {len(references)} lines but {f.input} has "
                f"{len(hypotheses)}; expected one reference per input line"
            )
        result = score(hypotheses, references)
        print(f"BLEU {result['bleu']:.2f}  {result['bleu_signature']}", file=sys.stderr)
        print(f"chrF {result['chrf']:.2f}  {result['chrf_signature']}", file=sys.stderr)


def translate_file(
    generate, params, src: str, dst: str, chunk_lines: int, scores: bool, *, total=None
) -> list[str]:
    """Streams ``src`` through ``generate`` (``Translator.translate`` or
    ``Continuer.continue_lines``) into ``dst`` (``output_stream``: a file appears only when
    complete); returns the best hypotheses. ``total``: the input's lines, for the progress."""
    best, count = [], 0
    with output_stream(dst) as out, Progress(total).active() as progress:
        for chunk in read_chunks(src, chunk_lines):
            results = generate(params, chunk, first_line=count)
            for nbest in results:
                out.write(format_line(nbest, scores) + "\n")
            out.flush()  # the lines done so far, in the partial file (or on stdout)
            best.extend(nbest[0][0] for nbest in results)
            count += len(chunk)
            progress.update(len(chunk), count)
    return best


def define_flags() -> None:
    """Command-line flags; defined on demand so that importing this module defines none."""
    flags.DEFINE_string("workdir", None, "Training workdir (config, tokenizer, checkpoints).")
    flags.DEFINE_string(
        "checkpoint", "latest", "latest, best, averaged, imported or a step number."
    )
    flags.DEFINE_string("input", "-", "File to translate, one sentence per line; - for stdin.")
    flags.DEFINE_string("output", "-", "Where to write translations; - for stdout.")
    flags.DEFINE_string("reference", None, "Reference translations: print BLEU and chrF.")
    # The search flags default to SearchConfig's fields, the one place the paper's settings live.
    search = SearchConfig()
    flags.DEFINE_enum("method", search.method, ["beam", "greedy", "sample"], "Search method.")
    flags.DEFINE_integer("beam_size", search.beam_size, "Beam size (the paper: 4).")
    flags.DEFINE_float("alpha", search.alpha, "Length penalty exponent (the paper: 0.6).")
    flags.DEFINE_integer("n_best", search.n_best, "Hypotheses per input line (tab-separated).")
    flags.DEFINE_enum(
        "stopping", search.stopping, list(STOPPING),
        "When beam search is done with a sentence: exact (no longer search could change the "
        "result) or count (beam_size finished hypotheses, as fairseq and CTranslate2: faster).",
    )  # fmt: skip
    flags.DEFINE_float("temperature", search.temperature, "Sampling temperature.")
    flags.DEFINE_integer("top_k", search.top_k, "Sample from the k most likely tokens (0: all).")
    flags.DEFINE_float(
        "top_p", search.top_p, "Sample from the smallest set with this probability mass."
    )
    flags.DEFINE_integer("seed", search.seed, "Sampling seed.")
    flags.DEFINE_integer(
        "max_new_tokens", None, "Language models: the most new tokens per line, EOS included "
        f"(default {search.extra_len}). Translation: the output may be this much longer than "
        f"the source (default {search.extra_len}, the paper's).",
    )  # fmt: skip
    flags.DEFINE_integer(
        "batch_tokens", 0, "Source tokens per batch (rows x padded width); 0: 2,048 on CPU and "
        "4,096 on accelerators when translating, 4,096 prompt + new tokens when continuing.",
    )  # fmt: skip
    flags.DEFINE_enum(
        "dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
        "Compute dtype to decode in; auto: the training dtype on GPU/TPU and on CPUs with AMX, "
        "float32 on other CPUs (faster there).",
    )  # fmt: skip
    flags.DEFINE_integer("chunk_lines", 10_000, "Lines read, sorted and written at a time.")
    flags.DEFINE_bool("scores", False, "Write each hypothesis's score before it.")
    flags.DEFINE_string(
        "attention_plot", None, "FILE.png: plot the first line's last-layer attention heads "
        "(encoder-decoder to FILE.png, self-attention to FILE-encoder.png, FILE-decoder.png).",
    )  # fmt: skip


if __name__ == "__main__":
    cli.run(
        main, define_flags, "decode", (DataError, FileNotFoundError, ValueError, CheckpointError)
    )
