"""What each architecture is trained to predict: the inputs and targets of one batch.

* ``encoder_decoder``: translation, the target given the source (teacher forcing).
* ``decoder_only``: next-token prediction over the batch's target side (a language model of
  the target language).
* ``encoder_only``: BERT's masked language modelling over both sides of the batch (a bilingual
  masked LM): ``mlm_mask`` picks 15% of the real tokens; of those 80% become the mask id, 10% a
  random token and 10% stay, and the model predicts the original tokens there.

The mask id of an encoder-only model is one embedding row past the tokenizer's vocabulary
(``mask_id(vocab_size)``): no tokenizer needs a mask piece, and no text ever encodes to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.encoder_only import mask_id
from model.tricks import bernoulli

MLM_RATE = 0.15
# Of the chosen tokens: the share masked, and the share replaced by a random token (the rest
# stay as they are), as in BERT.
MLM_MASKED, MLM_RANDOM = 0.8, 0.1


def mlm_mask(
    rng: jax.Array,
    ids: jax.Array,
    *,
    vocab_size: int,
    first_regular_id: int,
    rate: float = MLM_RATE,
) -> tuple[jax.Array, jax.Array]:
    """BERT's masking of ``ids [B, T]`` (0 = padding).

    Only regular tokens (``id >= first_regular_id``: not padding, EOS, BOS or UNK) are chosen,
    each with probability ``rate``. A chosen token becomes ``mask_id(vocab_size)`` with
    probability 0.8, a random regular token with 0.1, and stays with 0.1.

    Args:
      rng: a PRNG key.
      ids: ``[B, T]`` int ids.
      vocab_size: the model's V (its last id is the mask).
      first_regular_id: the smallest id of a real piece.
      rate: the share of regular tokens chosen.

    Returns:
      ``(inputs [B, T], targets [B, T])``: the corrupted ids, and the original ids where a token
      was chosen (0 elsewhere: not scored).
    """
    choose, kind, random_rng = jax.random.split(rng, 3)
    regular = ids >= first_regular_id
    chosen = regular & bernoulli(choose, rate, ids.shape)
    u = jax.random.uniform(kind, ids.shape)
    random_ids = jax.random.randint(random_rng, ids.shape, first_regular_id, mask_id(vocab_size))
    inputs = jnp.where(chosen & (u < MLM_MASKED), mask_id(vocab_size), ids)
    inputs = jnp.where(
        chosen & (u >= MLM_MASKED) & (u < MLM_MASKED + MLM_RANDOM), random_ids, inputs
    )
    return inputs.astype(ids.dtype), jnp.where(chosen, ids, 0).astype(ids.dtype)
