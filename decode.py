"""Translates a file with a trained workdir (or, with a decoder-only LM's workdir, continues each
line): one output line per input line, in order.

    python decode.py --workdir=DIR --input=FILE|- --output=FILE|- \
        [--checkpoint=latest|best|averaged|STEP] [--beam_size=4 --alpha=0.6 --n_best=1] \
        [--stopping=exact|count] \
        [--method=beam|greedy|sample --temperature=1 --top_k=0 --top_p=1 --seed=0] \
        [--batch_tokens=0] [--dtype=auto] [--reference=FILE] [--scores] [--attention_plot=FILE.png]

Input is read in chunks of ``--chunk_lines`` lines; each chunk is sorted by length into
token-budget batches, translated, put back in order and written (and flushed) before the next
chunk is read. An empty input line gives an empty output line; an over-long one is truncated
to the model's maximum length (and counted in the log), never dropped.

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

import logging
import sys
from collections.abc import Iterator

from absl import flags

import cli
from data import DataError
from decoding.beam_search import STOPPING
from decoding.continuation import Continuer
from decoding.scoring import score
from decoding.translate import SearchConfig, Translator
from interop.workdir import load
from model import make_mesh
from model.compilation import enable_compilation_cache, exported_dir

log = logging.getLogger("decode")


def read_chunks(path: str, chunk_lines: int) -> Iterator[list[str]]:
    """Lines of ``path`` (or stdin) in chunks; invalid UTF-8 is an error naming file and line."""
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    name = "<stdin>" if path == "-" else path
    chunk, number = [], 0
    try:
        for number, raw in enumerate(stream, start=1):  # noqa: B007
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{name}:{number}: invalid UTF-8 at byte {err.start} ({raw[:60]!r}); "
                    "expected UTF-8 text"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            chunk.append(line.rstrip("\r\n"))
            if len(chunk) == chunk_lines:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def format_line(nbest: list[tuple[str, float]], with_scores: bool) -> str:
    """One output line: hypotheses tab-separated, each optionally preceded by its score."""
    if with_scores:
        return "\t".join(f"{s:.4f}\t{h}" for h, s in nbest)
    return "\t".join(h for h, _ in nbest)


def main():
    f = flags.FLAGS
    if f.workdir is None:
        raise cli.UsageError("--workdir is required")
    if f.attention_plot and f.input == "-":
        raise cli.UsageError("--attention_plot needs --input=FILE (it re-reads the first line)")
    enable_compilation_cache()
    search = SearchConfig(
        method=f.method, beam_size=f.beam_size, alpha=f.alpha, n_best=f.n_best,
        stopping=f.stopping, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
        seed=f.seed,
        **({} if f.max_new_tokens is None else {"extra_len": f.max_new_tokens}),
    )  # fmt: skip
    mesh = make_mesh()
    model, params, tokenizer = load(f.workdir, f.checkpoint, mesh)
    kind = model.config.architecture
    if kind == "encoder_only":
        raise ValueError(
            f"{f.workdir} holds an encoder-only (masked LM) model: there is nothing to "
            "generate; decode.py translates (encoder-decoder) or continues prompts "
            "(decoder-only)"
        )
    if kind == "decoder_only":
        if f.attention_plot or f.reference:
            raise cli.UsageError("--attention_plot and --reference are for translation")
        continuer = Continuer(
            model, tokenizer, search, mesh=mesh, tokens_per_batch=f.batch_tokens or None,
            dtype=f.dtype, exported=exported_dir(),
        )  # fmt: skip
        translate_file(continuer.continue_lines, params, f.input, f.output, f.chunk_lines,
                       f.scores)  # fmt: skip
        return
    translator = Translator(
        model, tokenizer, search, mesh=mesh, tokens_per_batch=f.batch_tokens or None,
        dtype=f.dtype, exported=exported_dir(),
    )  # fmt: skip
    hypotheses = translate_file(
        translator.translate, params, f.input, f.output, f.chunk_lines, f.scores
    )
    if f.attention_plot and hypotheses:
        import plots  # matplotlib is only needed for this flag

        first = next(read_chunks(f.input, 1))[0]
        figures = plots.attention_for_sentence(model, params, tokenizer, first, hypotheses[0])
        for path in plots.save_attention(figures, f.attention_plot):
            log.info("wrote %s", path)
    if f.reference:
        references = [line for chunk in read_chunks(f.reference, 1 << 30) for line in chunk]
        if len(references) != len(hypotheses):
            raise DataError(
                f"{f.reference} has {len(references)} lines but {f.input} has "
                f"{len(hypotheses)}; expected one reference per input line"
            )
        result = score(hypotheses, references)
        print(f"BLEU {result['bleu']:.2f}  {result['bleu_signature']}", file=sys.stderr)
        print(f"chrF {result['chrf']:.2f}  {result['chrf_signature']}", file=sys.stderr)


def translate_file(generate, params, src: str, dst: str, chunk_lines: int, scores: bool):
    """Streams ``src`` through ``generate`` (``Translator.translate`` or
    ``Continuer.continue_lines``) into ``dst``; returns the best hypotheses."""
    out = sys.stdout if dst == "-" else open(dst, "w", encoding="utf-8")  # noqa: SIM115
    best, count = [], 0
    try:
        for chunk in read_chunks(src, chunk_lines):
            results = generate(params, chunk, first_line=count)
            for nbest in results:
                out.write(format_line(nbest, scores) + "\n")
            out.flush()
            best.extend(nbest[0][0] for nbest in results)
            count += len(chunk)
            log.info("translated %d lines", count)
    finally:
        if out is not sys.stdout:
            out.close()
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
    cli.run(main, define_flags, "decode", (DataError, FileNotFoundError, ValueError))
