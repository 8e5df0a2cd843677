"""Decoding: greedy search, sampling and beam search over any ``tokens_to_logits`` function.

Modules (each has one job):

- `beam_search`: `beam_search` with the GNMT length penalty, per-sentence length limits,
  early stopping and n-best output (the paper's decoder), and `length_penalty`.
- `sampling`: `greedy_search` and `sample` (temperature, top-k, top-p).
- `tokens_to_logits`: `cached_decoder` / `uncached_decoder`, which turn a `Transformer`, its
  variables and a source batch into ``(tokens_to_logits, initial cache)``, and `lm_decoder`, the
  same for a `DecoderOnlyLM` and a batch of prompts.
- `cache`: the cache contract and the length limits shared by the searches.
- `translate`: `Translator`, sentences in and translations out (batching, detokenization), and
  `SearchConfig`, the search settings and their defaults.
- `scoring`: `score`, corpus BLEU and chrF with sacreBLEU.

The searches see the model only through ``tokens_to_logits(ids [B, 1] int32, cache) ->
(logits [B, V] float32, cache)`` and a cache pytree whose non-scalar leaves have the batch as
their leading dimension (beam search tiles and reorders those per beam; 0-d leaves such as a
step index are shared; ``PerSentence`` entries stay one per sentence; ``Positions`` entries
grow with the steps: see `cache`). They are ``lax.while_loop``s, jit-compatible with the
sizes static:

    @functools.partial(jax.jit, static_argnames="cache_length")
    def translate(variables, src, max_lengths, cache_length):
        fn, cache = decoding.cached_decoder(model, variables, src, cache_length)
        seqs, scores = decoding.beam_search(fn, cache, batch_size=src.shape[0], bos_id=2,
                                            eos_id=1, max_len=cache_length, max_lengths=max_lengths)
        return seqs[:, 0]   # [B, cache_length]: the best hypothesis, EOS then 0s
"""

from decoding.beam_search import beam_search, length_penalty
from decoding.cache import PerSentence, Positions
from decoding.sampling import greedy_search, sample, top_k_filter, top_p_filter
from decoding.tokens_to_logits import cached_decoder, lm_decoder, uncached_decoder

__all__ = [
    "PerSentence",
    "Positions",
    "beam_search",
    "cached_decoder",
    "greedy_search",
    "length_penalty",
    "lm_decoder",
    "sample",
    "top_k_filter",
    "top_p_filter",
    "uncached_decoder",
]
