"""Translation quality: corpus BLEU and chrF of detokenized hypotheses, with sacreBLEU.

It sits beside the decoding library because everything that produces translations scores them
the same way: the dev evaluation during training, `decode.py --reference`, and the
CTranslate2 comparison benchmark. One function keeps their numbers comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF on detokenized text, with sacreBLEU's signatures.

    Args:
        hypotheses: One translation per sentence.
        references: One reference per sentence, aligned with `hypotheses`.

    Returns:
        ``{'bleu', 'chrf'}`` (floats, 0-100) and ``{'bleu_signature', 'chrf_signature'}``
        (sacreBLEU's strings, which record tokenization and smoothing).
    """
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
