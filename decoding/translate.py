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
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data import Tokenizer, decoding_batches, restore_order
from decoding.beam_search import STOPPING, beam_search
from decoding.exported import ExportedCache, dispatch
from decoding.sampling import greedy_search, sample
from decoding.tokens_to_logits import cached_decoder, for_decoding
from model import Transformer, use_mesh
from model.sharding import place_batch

log = logging.getLogger(__name__)

# The largest length penalty exponent SearchConfig takes (see SearchConfig.validate).
ALPHA_MAX = 10.0


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How to search.

    Attributes:
      method: "beam", "greedy" or "sample".
      beam_size, alpha: beam search (the paper: 4 and 0.6).
      n_best: hypotheses returned per sentence (beam only; at most beam_size).
      stopping: when beam search is done with a sentence: "exact" (nothing a longer search
        could find would change the result) or "count" (W finished hypotheses, as fairseq and
        CTranslate2); see ``decoding.beam_search``.
      extra_len: the output may be this much longer than the source (the paper: 50).
      temperature, top_k, top_p, seed: sampling.
    """

    method: str = "beam"
    beam_size: int = 4
    alpha: float = 0.6
    n_best: int = 1
    stopping: str = "exact"
    extra_len: int = 50
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuses settings no search can use, before any model is loaded or traced.

        Raises:
          ValueError: one line naming the setting by its ``decode.py`` flag, the value and the
            allowed range (``training.evaluation`` takes ``beam_size`` and ``alpha`` from the
            config fields of the same names).
        """
        if self.method not in ("beam", "greedy", "sample"):
            raise ValueError(f"search method must be beam, greedy or sample, got {self.method!r}")
        if self.stopping not in STOPPING:
            raise ValueError(
                f"stopping must be one of {', '.join(STOPPING)}, got {self.stopping!r}"
            )
        if self.beam_size < 1:
            raise ValueError(f"--beam_size={self.beam_size}: must be at least 1")
        if self.method != "beam" and self.n_best != 1:
            raise ValueError(f"--n_best={self.n_best} needs --method=beam (the default)")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(
                f"--n_best={self.n_best}: must be within [1, --beam_size={self.beam_size}]"
            )
        # The cap: lp(n) = ((5 + n) / 6) ** alpha is computed in float32 (largest 3.4e38). At
        # alpha = 10 it is at most 2e22 for outputs of 1,024 tokens (2e28 for 4,096), but it
        # overflows to inf from alpha = 17.2 (13.6 for 4,096 tokens): log P / inf is -0.0 for
        # every hypothesis, all tie, and the search returns whatever comes first. Useful values
        # are 0 to about 2 (the paper: 0.6), so 10 leaves room and stays far from overflow.
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= ALPHA_MAX):
            raise ValueError(
                f"--alpha={self.alpha:g}: the length penalty exponent must be a finite number "
                f"within [0, {ALPHA_MAX:g}] (the paper: 0.6)"
            )
        if self.extra_len < 1:
            raise ValueError(f"--max_new_tokens={self.extra_len}: must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"--temperature={self.temperature:g}: must be a finite number > 0 (1: the "
                "model's own distribution)"
            )
        if self.top_k < 0:
            raise ValueError(f"--top_k={self.top_k}: must be at least 0 (0: all tokens)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p={self.top_p:g}: must be within (0, 1] (1: all tokens)")

    def run(self, tokens_to_logits, cache, rng, **common) -> tuple[jax.Array, jax.Array]:
        """Runs this search (inside jit): ``common`` are the searches' shared arguments
        (``batch_size``, ``bos_id``, ``eos_id``, ``max_len``, optional ``max_lengths``).

        Returns:
          ``(ids [B, n_best, T] int32, scores [B, n_best] float32)``; the scores of greedy
          search and sampling are 0.
        """
        fn = tokens_to_logits
        if self.method == "beam":
            return beam_search(
                fn, cache, beam_size=self.beam_size, alpha=self.alpha, n_best=self.n_best,
                stopping=self.stopping, **common,
            )  # fmt: skip
        if self.method == "greedy":
            ids, _ = greedy_search(fn, cache, **common)
        else:
            ids, _ = sample(
                fn, cache, rng, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                **common,
            )  # fmt: skip
        return ids[:, None, :], jnp.zeros((ids.shape[0], 1), jnp.float32)


def default_tokens_per_batch() -> int:
    """The source-token budget of a translation batch for this backend.

    On CPU, 2,048 tokens (64 sentences of 32 tokens, 256 beam rows) translated the 902 dev
    sentences 1.10x faster than 4,096 (interleaved passes, best of 3; 2-core AMD EPYC Zen 4),
    and 300 of them 1.07x faster than 1,024: smaller batches waste fewer steps on settled
    sentences, larger ones use the matmuls better. Accelerators, with far more parallel width,
    get 4,096.
    """
    return 2048 if jax.default_backend() == "cpu" else 4096


class Translator:
    """Translates lists of sentences with a trained model.

    Args:
      model: the Transformer.
      tokenizer: the shared tokenizer the model was trained with.
      search: a SearchConfig.
      mesh: optional device mesh; batches are split along its data x fsdp axes.
      tokens_per_batch: source-token budget per batch (rows x width); None:
        ``default_tokens_per_batch()``.
      dtype: the compute dtype to decode in; "auto": the model's on accelerators and CPUs
        with AMX, float32 on other CPUs (``decoding.tokens_to_logits.for_decoding``). ``self.model``
        is the model that decodes.
      exported: optional directory of traced searches (``decoding.exported``): a batch shape
        searched once, by any run, is not traced again. Used when the mesh (or, without one,
        the process) has a single device; sharded searches are traced as before.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        search: SearchConfig = SearchConfig(),
        *,
        mesh: Mesh | None = None,
        tokens_per_batch: int | None = None,
        dtype: str = "auto",
        exported: str | Path | None = None,
    ):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: the tokenizer does not belong to this model"
            )
        self.model = for_decoding(model, dtype)
        self.tokenizer, self.search, self.mesh = tokenizer, search, mesh
        self.tokens_per_batch = tokens_per_batch or default_tokens_per_batch()
        self._shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self._run = jax.jit(self._search, static_argnames="cache_length")
        self._exported = ExportedCache.for_mesh(exported, mesh)
        # Sentences whose output limit the position table cut, over every call: the warning is
        # logged for the first batch only (a 12k-line file said it 270 times), and
        # ``log_cut_sentences`` gives the total.
        self.cut_sentences = 0
        self._cut_first = None

    def log_cut_sentences(self) -> None:
        """Logs how many sentences in all may produce fewer than source length + ``extra_len``
        tokens, if more than the first warning said."""
        if self._cut_first is not None and self.cut_sentences > self._cut_first:
            log.warning(
                "in all, %d sentences may produce fewer than source length + %d tokens "
                "(max_positions=%d)",
                self.cut_sentences, self.search.extra_len, self.model.config.max_positions,
            )  # fmt: skip

    def _search(self, params, src, max_lengths, rng, cache_length):
        fn, cache = cached_decoder(self.model, {"params": params}, src, cache_length)
        return self.search.run(
            fn, cache, rng, batch_size=src.shape[0], bos_id=self.tokenizer.bos_id,
            eos_id=self.tokenizer.eos_id, max_len=cache_length, max_lengths=max_lengths,
        )  # fmt: skip

    def batches(self, sources: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """The padded, length-sorted batches ``translate`` runs on (exposed for tests)."""
        return decoding_batches(
            sources,
            self.tokenizer,
            max_tokens=max(2, self.model.config.max_positions - 1),
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
        length = min(cfg.max_positions, src.shape[1] + extra)
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
        cfg, extra = self.model.config, self.search.extra_len
        rng = jax.random.fold_in(jax.random.key(self.search.seed), first_line)
        description = (  # what the search's program depends on besides code and shapes
            f"Translator._search {cfg!r} {self.search!r} bos={self.tokenizer.bos_id} "
            f"eos={self.tokenizer.eos_id}"
        )
        pending = []
        with use_mesh(self.mesh):
            for i, batch in enumerate(self.batches(sources)):
                src = batch["inputs"]
                length, limits = self.output_limits(src)
                real = batch["index"] >= 0
                cut = int(np.sum(real & (np.sum(src > 0, axis=1) + extra > length)))
                if cut and self._cut_first is None:
                    self._cut_first = cut
                    log.warning(
                        "%d sentences may produce fewer than source length + %d tokens: the "
                        "model's position table ends at max_positions=%d (said for the first batch "
                        "only; later ones are counted)",
                        cut, extra, cfg.max_positions,
                    )  # fmt: skip
                self.cut_sentences += cut
                out = dispatch(
                    self._exported, self._run, self._search, description, params,
                    place_batch(src, self.mesh), place_batch(limits, self.mesh),
                    jax.random.fold_in(rng, i), cache_length=length,
                )  # fmt: skip
                pending.append((batch, out))  # dispatched; read back below
            indices, outputs = [], []
            for batch, (ids, scores) in pending:
                outputs.append(self._detokenize(batch["inputs"], _to_host(ids), _to_host(scores)))
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
