"""Prompts in, continuations out, for a decoder-only language model.

Each prompt becomes BOS + its pieces (no EOS: the model is to go on). Prompts of the same
length share batches (a cache position is the same for every row of a batch), the jitted
search runs from the prompt's last token (``decoding.lm_decoder``), and the new tokens up to
EOS are detokenized. Every input line gets exactly one output line, in order; an empty line
gets an empty continuation. Shapes: B rows, P prompt length, L cache length.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from data import Tokenizer
from decoding.exported import ExportedCache, dispatch
from decoding.tokens_to_logits import for_decoding, lm_decoder
from decoding.translate import SearchConfig
from model import DecoderOnlyLM, use_mesh

log = logging.getLogger(__name__)


class Continuer:
    """Continues prompts with a trained ``DecoderOnlyLM``.

    Args:
      model: the DecoderOnlyLM.
      tokenizer: the tokenizer it was trained with.
      search: a SearchConfig (default: beam 4); ``extra_len`` is the most new tokens (EOS included).
      mesh: optional device mesh (the batches run inside it; rows are not split).
      tokens_per_batch: budget of prompt + new tokens per batch (rows x L); None: 4,096.
      dtype: the compute dtype to decode in ("auto": as for ``Translator``).
      exported: optional directory of traced searches (``decoding.exported``; one device only),
        as for ``Translator``: every prompt length is a shape, so a warm run saves much tracing.
    """

    def __init__(
        self,
        model: DecoderOnlyLM,
        tokenizer: Tokenizer,
        search: SearchConfig | None = None,
        *,
        mesh=None,
        tokens_per_batch: int | None = None,
        dtype: str = "auto",
        exported: str | Path | None = None,
    ):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: the tokenizer does not belong to this model"
            )
        self.model, self.tokenizer, self.mesh = for_decoding(model, dtype), tokenizer, mesh
        self.search = search or SearchConfig()
        self.tokens_per_batch = tokens_per_batch or 4096
        self._run = jax.jit(self._search, static_argnames=("new_tokens",))
        self._exported = ExportedCache.for_mesh(exported, mesh)

    def _search(self, params, prompts, rng, new_tokens):
        length = prompts.shape[1] + new_tokens
        fn, cache, first = lm_decoder(self.model, {"params": params}, prompts, length)
        return self.search.run(
            fn, cache, rng, batch_size=prompts.shape[0], bos_id=first,
            eos_id=self.tokenizer.eos_id, max_len=new_tokens,
        )  # fmt: skip

    def prompts(self, lines: Sequence[str]) -> list[list[int]]:
        """BOS + pieces of each line, cut to the model's positions (keeping the end) so that
        at least one new token fits; empty lines give ``[]``."""
        limit = self.model.config.max_positions - 1
        ids = self.tokenizer.encode_batch(list(lines))
        out, cut = [], 0
        for line, pieces in zip(lines, ids, strict=True):
            if not line.strip():
                out.append([])
                continue
            if len(pieces) + 1 > limit:
                pieces, cut = pieces[len(pieces) + 1 - limit :], cut + 1
            out.append([self.tokenizer.bos_id, *pieces])
        if cut:
            log.warning(
                "%d prompts were cut to their last %d tokens (max_positions)", cut, limit - 1
            )
        return out

    def continue_lines(
        self, params, lines: Sequence[str], *, first_line: int = 0
    ) -> list[list[tuple[str, float]]]:
        """Per line, ``n_best`` (continuation, score) pairs (score 0 for greedy and sampling).

        Args:
          params: the model's parameters.
          lines: the prompts.
          first_line: the global index of ``lines[0]`` (sampling keys derive from it).
        """
        s, cfg = self.search, self.model.config
        results: list = [[("", 0.0)] * s.n_best for _ in lines]
        by_length = collections.defaultdict(list)
        for i, prompt in enumerate(self.prompts(lines)):
            if prompt:
                by_length[len(prompt)].append((i, prompt))
        rng = jax.random.fold_in(jax.random.key(s.seed), first_line)
        description = f"Continuer._search {cfg!r} {s!r} eos={self.tokenizer.eos_id}"
        with use_mesh(self.mesh):
            for p, items in sorted(by_length.items()):
                new_tokens = max(1, min(s.extra_len, cfg.max_positions - p + 1))
                rows = max(1, self.tokens_per_batch // (p + new_tokens))
                for start in range(0, len(items), rows):
                    chunk = items[start : start + rows]
                    # Rows rounded up to a power of two: few compiled shapes per length.
                    padded = 1 << (len(chunk) - 1).bit_length()
                    prompts = np.zeros((padded, p), np.int32)
                    prompts[: len(chunk)] = [prompt for _, prompt in chunk]
                    prompts[len(chunk) :] = prompts[0]
                    key = jax.random.fold_in(rng, chunk[0][0])
                    out = dispatch(
                        self._exported, self._run, self._search, description, params, prompts,
                        key, new_tokens=new_tokens,
                    )  # fmt: skip
                    ids, scores = jax.device_get(out)
                    for r, (i, _) in enumerate(chunk):
                        texts = self.tokenizer.decode_batch(np.asarray(ids[r]).tolist())
                        results[i] = list(zip(texts, np.asarray(scores[r]).tolist(), strict=True))
        return results
