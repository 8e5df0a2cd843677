"""Translating with a CTranslate2 export the way ``decode.py`` does.

    translator = ctranslate2.Translator("runs/default-ct2")
    interop.ctranslate2_run.translate(translator, tokenizer, sentences, max_positions=256,
                                      beam_size=4, alpha=0.6)

``source_tokens`` is decode.py's encoder input, ``max_decoding_length`` its output limit,
``gnmt_score`` its length penalty, and ``translate`` all of them over length-sorted batches. The
export itself is ``interop.ctranslate2``'s job. This module imports no JAX at module level (nor
does ``translate`` when given ``beam_size``, ``alpha`` and ``extra_len``): a user of the export,
such as ``bench/decode_vs_ctranslate2.py``'s worker process, runs it without the model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import ctranslate2
import numpy as np
import sentencepiece as spm

from data.tokenizer import EOS_ID, PAD_ID, Tokenizer


def source_tokens(tokenizer: Tokenizer, text: str, max_positions: int) -> list[str]:
    """The encoder input of ``decode.py``: pieces then ``</s>``, at most ``max_positions - 1``
    tokens (longer sources lose their tail, EOS stays last); ``[]`` for a text with no pieces."""
    ids = tokenizer.encode(text)
    if not ids:
        return []
    ids = [*ids[: max(2, max_positions - 1) - 1], EOS_ID]
    return [tokenizer.id_to_piece(i) for i in ids]


def max_decoding_length(source_length: int, max_positions: int, extra_len: int = 50) -> int:
    """CT2's ``max_decoding_length`` for the project's output limit (EOS counted).

    The project forces EOS at its limit ``L = min(source_length + extra_len, max_positions)``
    (source length with EOS), so at most ``L - 1`` real tokens; CT2 stops after
    ``max_decoding_length`` tokens without forcing EOS, hence ``L - 1``.
    """
    return max(1, min(source_length + extra_len, max_positions) - 1)


def gnmt_score(ct2_score: float, length: int, alpha: float) -> float:
    """A CT2 beam score (``log P / length ** alpha``) rescored with the project's GNMT penalty
    (``log P / ((5 + length) / 6) ** alpha``); ``length`` counts EOS, as both engines do."""
    return ct2_score * length**alpha / ((5.0 + length) / 6.0) ** alpha


def translate(
    translator: ctranslate2.Translator,
    tokenizer: Tokenizer | spm.SentencePieceProcessor,
    texts: Sequence[str],
    *,
    max_positions: int,
    beam_size: int | None = None,
    alpha: float | None = None,
    batch_tokens: int = 4096,
    extra_len: int | None = None,
    rescore: bool = True,
) -> list[str]:
    """Translates ``texts`` with a CTranslate2 export, in order, like ``decode.py``.

    Sources are sorted by length and batched under a ``batch_tokens`` budget (rows x longest);
    each batch gets the output limit of its longest source. Texts without pieces give "".

    CTranslate2's ``length_penalty`` divides by ``length ** alpha``, the project by GNMT's
    ``((5 + length) / 6) ** alpha`` (EOS counted in both), and no CT2 setting gives the latter.
    The beam itself ranks by log-probability in both, and with a non-zero penalty CT2 stops
    once ``beam_size`` hypotheses have finished; so with ``rescore`` all of them are returned
    and the best by the GNMT score is kept. What remains different: the project keeps searching
    until no live hypothesis can beat its best, and keeps ``<pad>``'s share of the softmax where
    CT2 renormalises without it (suppressed: neither engine emits it). Greedy search
    (``beam_size=1``) with one sentence per batch gives the project's outputs exactly.

    Args:
      translator: a ``ctranslate2.Translator`` over an export of the model.
      tokenizer: the model's tokenizer: the project's ``Tokenizer`` or the
        ``sentencepiece.SentencePieceProcessor`` of the export's ``tokenizer.model``.
      texts: source sentences.
      max_positions: the model's ``max_positions`` (longest source and output, EOS included).
      beam_size: 1 for greedy search.
      alpha: the length-penalty exponent.
      batch_tokens: source-token budget per ``translate_batch`` call (at least one sentence).
      extra_len: outputs may be this much longer than their source.
        (``beam_size``, ``alpha``, ``extra_len``: None takes ``SearchConfig``'s default, which
        imports JAX; a caller that must stay JAX-free passes all three.)
      rescore: pick among CT2's finished hypotheses by the GNMT score (beam search only).

    Returns:
      One detokenized translation per text.
    """
    if None in (beam_size, alpha, extra_len):
        # Imported here: the search defaults live with decode.py's, but an export's user need
        # not load JAX.
        from decoding.translate import SearchConfig

        default = SearchConfig()
        beam_size = default.beam_size if beam_size is None else beam_size
        alpha = default.alpha if alpha is None else alpha
        extra_len = default.extra_len if extra_len is None else extra_len
    if not isinstance(tokenizer, Tokenizer) and hasattr(tokenizer, "serialized_model_proto"):
        tokenizer = Tokenizer(tokenizer.serialized_model_proto())
    sources = [source_tokens(tokenizer, t, max_positions) for t in texts]
    ids = {tokenizer.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
    order = sorted((i for i, s in enumerate(sources) if s), key=lambda i: len(sources[i]))
    rescore = rescore and beam_size > 1 and alpha != 0
    outputs = [""] * len(texts)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(sources[order[end]]) <= batch_tokens:
            end += 1
        batch = order[start:end]
        results = translator.translate_batch(
            [sources[i] for i in batch],
            beam_size=beam_size,
            num_hypotheses=beam_size if rescore else 1,
            length_penalty=alpha,
            max_decoding_length=max_decoding_length(
                len(sources[batch[-1]]), max_positions, extra_len
            ),
            min_decoding_length=0,  # The project may end with EOS at once (CT2's default is 1).
            max_input_length=0,
            suppress_sequences=[[tokenizer.id_to_piece(PAD_ID)]],
            return_scores=rescore,
            return_end_token=True,  # So that the hypothesis length counts EOS.
        )
        for i, result in zip(batch, results, strict=True):
            best = 0
            if rescore:
                scores = [
                    gnmt_score(score, len(hyp), alpha)
                    for hyp, score in zip(result.hypotheses, result.scores, strict=True)
                ]
                best = int(np.argmax(scores))
            outputs[i] = tokenizer.decode([ids[piece] for piece in result.hypotheses[best]])
        start = end
    return outputs
