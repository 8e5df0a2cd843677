"""Sentences in, translations out: batching, device placement, search, detokenization.

Sources are sorted by length into token-budget batches of few shapes
(``data.decoding_batches``), each batch is placed along the mesh's data axes, the jitted search
runs (encoder once, cached decoder steps), the ids are detokenized and the original order is
restored, so every input line gets exactly one output, in order.

Every batch is dispatched before the first result is read back, so the host's detokenizing
overlaps the device's decoding and the device never waits for the host between batches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data import Tokenizer, decoding_batches, restore_order
from decoding.beam_search import beam_search
from decoding.model_fns import cached_decoder
from decoding.sampling import greedy_search, sample
from model import Transformer, use_mesh
from model.sharding import place_batch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How to search.

    Attributes:
      method: "beam", "greedy" or "sample".
      beam_size, alpha: beam search (the paper: 4 and 0.6).
      n_best: hypotheses returned per sentence (beam only; at most beam_size).
      extra_len: the output may be this much longer than the source (the paper: 50).
      temperature, top_k, top_p, seed: sampling.
    """

    method: str = "beam"
    beam_size: int = 4
    alpha: float = 0.6
    n_best: int = 1
    extra_len: int = 50
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("beam", "greedy", "sample"):
            raise ValueError(f"search method must be beam, greedy or sample, got {self.method!r}")
        if self.beam_size < 1 or not 1 <= self.n_best <= max(self.beam_size, 1):
            raise ValueError(
                f"need beam_size >= 1 and 1 <= n_best <= beam_size, got beam_size="
                f"{self.beam_size}, n_best={self.n_best}"
            )
        if self.method != "beam" and self.n_best != 1:
            raise ValueError(f"n_best={self.n_best} needs method='beam'")


class Translator:
    """Translates lists of sentences with a trained model.

    Args:
      model: the Transformer.
      tokenizer: the shared tokenizer the model was trained with.
      search: a SearchConfig.
      mesh: optional device mesh; batches are split along its data x fsdp axes.
      tokens_per_batch: source-token budget per batch (rows x width).
      first_pass: beam search in two passes (the default): a short partial search per batch
        (``first_pass_length`` steps, stopping once an eighth of its sentences are left), then
        a full search of the sentences it left unfinished. The translations are exactly those
        of one full search; False runs the full search only (to check that).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        search: SearchConfig = SearchConfig(),
        *,
        mesh: Mesh | None = None,
        tokens_per_batch: int = 4096,
        first_pass: bool = True,
    ):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: the tokenizer does not belong to this model"
            )
        self.model, self.tokenizer, self.search, self.mesh = model, tokenizer, search, mesh
        self.tokens_per_batch = tokens_per_batch
        self._shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.first_pass = first_pass
        self._run = jax.jit(self._search, static_argnames=("max_len", "max_unfinished"))

    def _search(self, params, src, max_lengths, rng, max_len, max_unfinished=None):
        """``(ids [B, N, max_len], scores [B, N], finished [B])`` for one batch."""
        s, tok = self.search, self.tokenizer
        fn, cache = cached_decoder(self.model, {"params": params}, src, max_len)
        common = dict(
            batch_size=src.shape[0], bos_id=tok.bos_id, eos_id=tok.eos_id, max_len=max_len,
            max_lengths=max_lengths,
        )  # fmt: skip
        if s.method == "beam":
            out = beam_search(
                fn, cache, beam_size=s.beam_size, alpha=s.alpha, n_best=s.n_best,
                max_unfinished=max_unfinished, **common,
            )  # fmt: skip
            return out if max_unfinished is not None else (*out, jnp.ones(src.shape[0], bool))
        if s.method == "greedy":
            ids, _ = greedy_search(fn, cache, **common)
        else:
            ids, _ = sample(
                fn, cache, rng, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, **common
            )
        zeros = jnp.zeros((ids.shape[0], 1), jnp.float32)
        return ids[:, None, :], zeros, jnp.ones(src.shape[0], bool)

    def batches(self, sources: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The padded, length-sorted batches ``translate`` runs on (exposed for tests)."""
        return decoding_batches(
            sources,
            self.tokenizer,
            max_len=max(2, self.model.config.max_len - 1),
            tokens_per_batch=self.tokens_per_batch,
            row_multiple=self._shards,
        )

    def output_limits(self, src: np.ndarray) -> tuple[int, np.ndarray]:
        """The batch's cache length and each row's output limit (EOS included).

        A sentence may produce its source length (EOS included) + ``extra_len`` tokens (the
        paper's +50), within the model's position table; rows without a source (filler rows,
        empty lines) stop at once.

        Returns:
          ``(L, limits [R] int32)``.
        """
        cfg, extra = self.model.config, self.search.extra_len
        length = min(cfg.max_len, src.shape[1] + extra)
        n = np.sum(src > 0, axis=1)
        limits = np.minimum(n + extra, length)
        limits[(n == 0) | (src[:, 0] == self.tokenizer.eos_id)] = 1
        return length, limits.astype(np.int32)

    def translate(
        self, params, sources: Sequence[str], *, first_line: int = 0
    ) -> list[list[tuple[str, float]]]:
        """Translates ``sources``; returns, per sentence, ``n_best`` (text, score) pairs.

        Scores are length-penalised log-probabilities for beam search (0 for greedy and
        sampling). An empty source gives an empty translation.

        Args:
          params: the model's parameters.
          sources: the sentences.
          first_line: the global index of ``sources[0]`` when a file is translated in chunks:
            sampling keys derive from it and the batch index, so no two batches of a file
            share a key.
        """
        if not sources:
            return []
        rng = jax.random.fold_in(jax.random.key(self.search.seed), first_line)
        two_pass = self.search.method == "beam" and self.first_pass
        with use_mesh(self.mesh):
            batches = self.batches(sources)
            indices, outputs = self._decode(params, batches, rng, partial=two_pass)
            # Pass 2: the sentences the short first pass left unfinished, searched fully.
            retry = np.concatenate([i[i < -1] for i in indices]) * -1 - 2
            if len(retry):
                again = self.batches([sources[i] for i in retry])
                for batch in again:
                    real = batch["index"] >= 0
                    batch["index"] = np.where(real, retry[np.maximum(batch["index"], 0)], -1)
                more = self._decode(params, again, rng, partial=False)  # beam: no keys
                indices, outputs = indices + more[0], outputs + more[1]
        indices = [np.maximum(i, -1) for i in indices]
        return restore_order(indices, outputs, len(sources))

    def _decode(self, params, batches, rng, *, partial: bool):
        """Runs every batch (all dispatched before the first is read back); returns each
        batch's ``index`` and outputs. With ``partial``, each batch takes a short first pass
        (see ``first_pass_length``) that stops once an eighth of its rows are unfinished; an
        unfinished row's index ``i`` comes back as ``-2 - i``."""
        cfg, extra = self.model.config, self.search.extra_len
        pending = []
        for i, batch in enumerate(batches):
            src = batch["inputs"]
            length, limits = self.output_limits(src)
            real = batch["index"] >= 0
            cut = int(np.sum(real & (np.sum(src > 0, axis=1) + extra > length)))
            if cut:
                log.warning(
                    "%d sentences may produce fewer than source length + %d tokens: the "
                    "model's position table ends at max_len=%d",
                    cut, extra, cfg.max_len,
                )  # fmt: skip
            steps, max_unfinished = length, None
            if partial:
                steps = min(length, first_pass_length(src.shape[1]))
                max_unfinished = src.shape[0] // 8
            out = self._run(
                params,
                place_batch(src, self.mesh),
                place_batch(limits, self.mesh),
                jax.random.fold_in(rng, i),
                steps,
                max_unfinished,
            )
            pending.append((batch, out))  # dispatched; read back below
        indices, outputs = [], []
        for batch, (ids, scores, finished) in pending:
            outputs.append(self._detokenize(batch["inputs"], _to_host(ids), _to_host(scores)))
            index = batch["index"]
            indices.append(np.where(_to_host(finished) | (index < 0), index, -2 - index))
        return indices, outputs

    def _detokenize(self, src: np.ndarray, ids: np.ndarray, scores: np.ndarray):
        rows = []
        for r in range(ids.shape[0]):
            if not (src[r] > 0).any() or src[r, 0] == self.tokenizer.eos_id:
                rows.append([("", 0.0)] * ids.shape[1])  # empty input line -> empty output
                continue
            texts = self.tokenizer.decode_batch(ids[r].tolist())
            rows.append(list(zip(texts, scores[r].astype(float).tolist(), strict=True)))
        return rows


def first_pass_length(width: int) -> int:
    """Steps (and cache positions) of the first pass for sources padded to ``width``.

    Translations are rarely much longer than their source, while the paper's limit (source +
    50) sizes a full search's cache and per-step cost for the rare runaway output.
    """
    return -(-(width + width // 4 + 8) // 8) * 8


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, gathering rows that live on other processes' devices."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
