"""Beam-search decoding speed: the key/value cache against re-running the whole prefix.

Run from the repository root:

    python -m bench.decode_speed                       # 128 dev sentences cached, 16 uncached
    python -m bench.decode_speed --sentences 32 --uncached-sentences 32 --dtype float32

Model: ``configs/default.py``'s (d_model 256, 4 heads, d_ff 1024, 3 + 3 layers, vocab 8000,
its compute dtype unless ``--dtype``), random weights. Sources: the first dev sentences of the
tiny corpus shipped in ``data/fixtures/`` (or ``--corpus``), tokenized with a SentencePiece
model trained on its train split (a fraction of a second). Search: beam 4, alpha 0.6, with EOS
masked until the last step so that every sentence takes exactly ``--out-len`` (64) steps under
both decoders.

The uncached decoder re-runs the full decoder over the ``[B*4, 64]`` prefix at every step (with
static shapes it cannot process only the positions filled so far), so its cost per step is
64 positions against the cache's one; it gets fewer sentences by default so the run stays
within a few minutes on 2 CPU cores. Rates are per sentence, so the counts need not match;
both use the same batch size. Compilation is timed apart (ahead of time). Numbers only.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from bench.results import markdown_table, write_result
from configs.default import get_config
from configs.tiny import CORPUS as TINY_CORPUS
from data.sources import ParallelText
from data.tokenizer import BOS_ID, EOS_ID, load_or_train
from decoding import beam_search, cached_decoder, uncached_decoder
from decoding.translate import SearchConfig
from model import Transformer
from training.state import model_config

SEARCH = SearchConfig()  # the paper's beam size and length penalty, as decode.py uses

ADAPTERS = {"cached": cached_decoder, "uncached": uncached_decoder}
# Finite, so that the EOS forced at the last step still has a (tiny) probability and every
# hypothesis ends normally; no other token is ever that unlikely.
NO_EOS = -1e9


def source_batches(args, vocab_size: int, count: int) -> list[np.ndarray]:
    """The first ``count`` dev sources as ``[batch, S]`` id arrays (ids + EOS, 0-padded).

    All batches share one width (the longest source, rounded up to 8) so each decoder compiles
    once; the last batch is topped up with copies of the first sentences.
    """
    corpus = Path(args.corpus)
    train = ParallelText(corpus / "train.en", corpus / "train.es")
    tok_path = Path(args.tokenizer or Path(tempfile.mkdtemp()) / "decode_speed.model")
    tok = load_or_train(tok_path, train, vocab_size=vocab_size)
    lines = (corpus / "dev.en").read_text(encoding="utf-8").splitlines()[:count]
    seqs = [ids[: args.max_src - 1] + [EOS_ID] for ids in tok.encode_batch(lines)]
    width = -(-max(len(s) for s in seqs) // 8) * 8
    seqs += seqs[: -len(seqs) % args.batch]
    src = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        src[r, : len(s)] = s
    print(
        f"{len(lines)} dev sources, {np.mean([len(s) for s in seqs]):.1f} tokens on average "
        f"(EOS included), padded to {width}; tokenizer vocab {tok.vocab_size}"
    )
    return np.split(src, len(seqs) // args.batch)


def make_search(model: Transformer, adapter: str, out_len: int, beam_size: int):
    """A jitted ``(variables, src [B, S]) -> best ids [B, out_len]`` beam search."""

    @jax.jit
    def search(variables, src):
        inner, cache = ADAPTERS[adapter](model, variables, src, out_len)

        def tokens_to_logits(ids, cache):
            logits, cache = inner(ids, cache)
            return logits.at[:, EOS_ID].set(NO_EOS), cache

        seqs, _ = beam_search(
            tokens_to_logits, cache, batch_size=src.shape[0], beam_size=beam_size,
            alpha=SEARCH.alpha, bos_id=BOS_ID, eos_id=EOS_ID, max_len=out_len,
        )  # fmt: skip
        return seqs[:, 0]

    return search


def measure(search, variables, batches: list[np.ndarray], sentences: int, out_len: int):
    """Compiles ahead of time, then decodes ``sentences`` sentences in batches.

    Returns:
      (compile seconds, decode seconds, sentences decoded, best ids of every row).
    """
    start = time.perf_counter()
    search = search.lower(variables, batches[0]).compile()
    compile_s = time.perf_counter() - start
    n_batches = -(-sentences // batches[0].shape[0])
    outputs = []
    start = time.perf_counter()
    for src in batches[:n_batches]:
        outputs.append(np.asarray(search(variables, src)))
    seconds = time.perf_counter() - start
    ids = np.concatenate(outputs)
    if not (np.all(ids[:, :-1] > EOS_ID) and np.all(ids[:, -1] == EOS_ID)):
        raise AssertionError(f"expected {out_len} tokens ending with EOS in every output")
    return compile_s, seconds, len(ids), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=128, help="for the cached decoder")
    parser.add_argument("--uncached-sentences", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="sentences per batch")
    parser.add_argument("--beam-size", type=int, default=SEARCH.beam_size)
    parser.add_argument("--out-len", type=int, default=64, help="output tokens per sentence")
    parser.add_argument("--max-src", type=int, default=128, help="source tokens kept")
    parser.add_argument("--dtype", help="compute dtype (default: configs/default.py's)")
    parser.add_argument(
        "--corpus", default=str(TINY_CORPUS), help="dir with train.{en,es} and dev.en"
    )
    parser.add_argument("--tokenizer", help="SentencePiece model to use or create")
    args = parser.parse_args()

    config = get_config()
    cfg = model_config(config, config.vocab_size)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    model = Transformer(cfg)
    described = (
        f"model: d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}, "
        f"{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, vocab {cfg.vocab_size}, "
        f"{cfg.dtype}; beam {args.beam_size}, {args.out_len} output tokens; "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    print(described)
    batches = source_batches(args, cfg.vocab_size, max(args.sentences, args.uncached_sentences))
    init = jax.jit(functools.partial(model.init, jax.random.key(0)))
    variables = nn.unbox(init(batches[0][:1], batches[0][:1]))

    rows, outputs = [], {}
    for adapter, count in (("cached", args.sentences), ("uncached", args.uncached_sentences)):
        search = make_search(model, adapter, args.out_len, args.beam_size)
        compile_s, seconds, n, outputs[adapter] = measure(
            search, variables, batches, count, args.out_len
        )
        rows.append((adapter, n, compile_s, seconds, n / seconds, n * args.out_len / seconds))

    print(
        f"\n{'decoder':<10} {'sentences':>9} {'compile s':>10} {'decode s':>9} "
        f"{'sentences/s':>12} {'tokens/s':>9} {'ms/step':>8}"
    )
    cells = []
    for adapter, n, compile_s, seconds, sps, tps in rows:
        ms_step = 1e3 * seconds / (-(-n // args.batch) * args.out_len)
        print(
            f"{adapter:<10} {n:>9} {compile_s:>10.1f} {seconds:>9.2f} {sps:>12.2f} "
            f"{tps:>9.0f} {ms_step:>8.1f}"
        )
        cells.append((adapter, n, f"{compile_s:.1f}", f"{seconds:.2f}", f"{sps:.2f}",
                      f"{tps:.0f}", f"{ms_step:.1f}"))  # fmt: skip
    speedup = f"speed-up of the cache: {rows[0][4] / rows[1][4]:.1f}x (sentences/s)"
    print(f"\n{speedup}")
    n = min(len(outputs["cached"]), len(outputs["uncached"]))
    same = np.mean(np.all(outputs["cached"][:n] == outputs["uncached"][:n], axis=1))
    identical = f"identical best outputs on the {n} sentences both decoded: {same:.0%}"
    print(identical)
    header = ("decoder", "sentences", "compile s", "decode s", "sentences/s", "tokens/s",
              "ms/step")  # fmt: skip
    text = "\n\n".join([described, markdown_table(header, cells), f"- {speedup}\n- {identical}"])
    print(f"wrote {write_result('decode_speed', text, argv=None)}")


if __name__ == "__main__":
    main()
