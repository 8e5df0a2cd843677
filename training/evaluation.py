"""Dev-set evaluation during training: loss and perplexity, BLEU and chrF (`decoding.scoring`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

import data
from decoding.scoring import score
from decoding.translate import SearchConfig, Translator
from model import Transformer
from model.sharding import place_batch

log = logging.getLogger("train")


class Evaluator:
    """Holds the dev set, batched once, and evaluates parameters on it."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: data.Tokenizer,
        dev_pairs: Sequence[tuple[str, str]],
        config: ml_collections.ConfigDict,
        *,
        mesh: Mesh,
        eval_step: Callable,
    ):
        self.mesh, self.eval_step, self.config = mesh, eval_step, config
        sources = [s for s, _ in dev_pairs]
        references = [t for _, t in dev_pairs]
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self._loss_batches = data.padded_batches(
            sources,
            tokenizer,
            targets=references,
            max_tokens=config.row_length,
            tokens_per_batch=config.eval_tokens_per_batch,
            row_multiple=shards,
            # Pairs training would leave out are left out here too: truncating a reference
            # scores the model on cut-off targets it never learnt to produce.
            overlong=config.overlong,
        )
        n = config.eval_sentences or len(sources)
        self._sources, self._references = sources[:n], references[:n]
        search = SearchConfig(
            method="beam" if config.beam_size > 1 else "greedy",
            beam_size=config.beam_size,
            alpha=config.alpha,
        )
        # Only the encoder-decoder translates: the family's halves have dev loss, perplexity
        # and accuracy only (``translates``).
        self.translates = model.config.architecture == "encoder_decoder"
        self.translator = None
        if self.translates:
            self.translator = Translator(
                model, tokenizer, search, mesh=mesh, tokens_per_batch=config.eval_tokens_per_batch
            )

    def dev_loss(self, params) -> dict:
        """Label-smoothed loss, perplexity (exp of the plain NLL) and accuracy per scored dev
        token: the target tokens, or an encoder-only model's masked tokens."""
        loss = nll = tokens = correct = 0.0
        for batch in self._loss_batches:
            placed = {k: place_batch(batch[k], self.mesh) for k in ("inputs", "targets")}
            sums = jax.device_get(self.eval_step(params, placed))
            loss, nll, tokens = loss + sums[0], nll + sums[1], tokens + sums[2]
            correct += sums[3]
        tokens = max(tokens, 1.0)
        return {
            "dev_loss": loss / tokens,
            "dev_nll": nll / tokens,
            "dev_ppl": math.exp(nll / tokens),
            "dev_accuracy": float(correct / tokens),
        }

    def bleu(self, params) -> dict:
        """Translates the dev sources (beam search as configured) and scores them."""
        outputs = self.translator.translate(params, self._sources)
        hypotheses = [nbest[0][0] for nbest in outputs]
        result = score(hypotheses, self._references)
        log.info("dev BLEU %.2f chrF %.2f (%s)", result["bleu"], result["chrf"],
                 result["bleu_signature"])  # fmt: skip
        shown = self.config.num_samples
        for src, hyp, ref in zip(
            self._sources[:shown], hypotheses[:shown], self._references[:shown], strict=True
        ):
            log.info("  src: %s\n  hyp: %s\n  ref: %s", src, hyp, ref)
        return result
