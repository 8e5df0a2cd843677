"""Sentences in, translations out: batching, device placement, search, detokenization.

Sources are grouped into length-bucketed, token-budget batches (``data.padded_batches``), each
batch is placed along the mesh's data axes, the jitted search runs (encoder once, cached decoder
steps), the ids are detokenized and the original order is restored, so every input line gets
exactly one output, in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data import Tokenizer, padded_batches, restore_order
from decoding.beam_search import beam_search
from decoding.model_fns import cached_decoder
from decoding.sampling import greedy_search, sample
from model import Transformer, use_mesh
from model.sharding import place_batch


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
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        search: SearchConfig = SearchConfig(),
        *,
        mesh: Mesh | None = None,
        tokens_per_batch: int = 4096,
    ):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: the tokenizer does not belong to this model"
            )
        self.model, self.tokenizer, self.search, self.mesh = model, tokenizer, search, mesh
        self.tokens_per_batch = tokens_per_batch
        self._shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self._run = jax.jit(self._search, static_argnames="max_len")

    def _search(self, params, src, rng, max_len):
        s, tok = self.search, self.tokenizer
        fn, cache = cached_decoder(self.model, {"params": params}, src, max_len)
        max_lengths = jnp.minimum(jnp.sum(src > 0, axis=1) + s.extra_len, max_len)
        common = dict(
            batch_size=src.shape[0], bos_id=tok.bos_id, eos_id=tok.eos_id, max_len=max_len
        )
        if s.method == "beam":
            return beam_search(
                fn, cache, beam_size=s.beam_size, alpha=s.alpha, n_best=s.n_best,
                max_lengths=max_lengths, **common,
            )  # fmt: skip
        if s.method == "greedy":
            ids, _ = greedy_search(fn, cache, max_lengths=max_lengths, **common)
        else:
            ids, _ = sample(
                fn, cache, rng, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                max_lengths=max_lengths, **common,
            )  # fmt: skip
        return ids[:, None, :], jnp.zeros((ids.shape[0], 1), jnp.float32)

    def batches(self, sources: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The padded, length-bucketed batches ``translate`` runs on (exposed for tests)."""
        cfg = self.model.config
        return padded_batches(
            sources,
            self.tokenizer,
            max_len=max(2, cfg.max_len - 1),
            tokens_per_batch=self.tokens_per_batch,
            row_multiple=self._shards,
        )

    def translate(self, params, sources: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Translates ``sources``; returns, per sentence, ``n_best`` (text, score) pairs.

        Scores are length-penalised log-probabilities for beam search (0 for greedy and
        sampling). An empty source gives an empty translation.
        """
        if not sources:
            return []
        cfg = self.model.config
        indices, outputs = [], []
        rng = jax.random.key(self.search.seed)
        with use_mesh(self.mesh):
            for i, batch in enumerate(self.batches(sources)):
                width = batch["inputs"].shape[1]
                max_len = min(cfg.max_len, width + self.search.extra_len)
                ids, scores = self._run(
                    params,
                    place_batch(batch["inputs"], self.mesh),
                    jax.random.fold_in(rng, i),
                    max_len,
                )
                ids, scores = _to_host(ids), _to_host(scores)
                outputs.append(self._detokenize(batch["inputs"], ids, scores))
                indices.append(batch["index"])
        return restore_order(indices, outputs, len(sources))

    def _detokenize(self, src: np.ndarray, ids: np.ndarray, scores: np.ndarray):
        rows = []
        for r in range(ids.shape[0]):
            if not (src[r] > 0).any() or src[r, 0] == self.tokenizer.eos_id:
                rows.append([("", 0.0)] * ids.shape[1])  # empty input line -> empty output
                continue
            texts = self.tokenizer.decode_batch(ids[r].tolist())
            rows.append(list(zip(texts, scores[r].astype(float).tolist(), strict=True)))
        return rows


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, gathering rows that live on other processes' devices."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
