"""Fields shared by every configuration, with their meaning. Each config file overrides some."""

import dataclasses

import ml_collections

from decoding.translate import SearchConfig
from model.config import TransformerConfig

_SEARCH = SearchConfig()


def _model_overrides() -> ml_collections.ConfigDict:
    """One placeholder per TransformerConfig field (None: keep the preset's value).

    Declaring them all lets any model field be set from the command line, e.g.
    ``--config.model.overrides.dropout_rate=0.0``. ``dtype`` also takes ``"auto"``: bf16 compute
    where the hardware has bf16 matmul units (GPU, TPU, CPU with AMX or AVX512-BF16), float32
    elsewhere, decided when the workdir starts (``runtime.hardware``).
    """
    # model/config.py postpones annotations, so f.type is a string ("Norm" etc. are str values).
    types = {"int": int, "float": float, "bool": bool}
    fields = {}
    for f in dataclasses.fields(TransformerConfig):
        if f.name == "vocab_size":  # set by the tokenizer (config.vocab_size)
            continue
        field_type = types.get(f.type, str)
        fields[f.name] = ml_collections.FieldReference(None, field_type=field_type)
    return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: a TransformerConfig preset plus overrides (any TransformerConfig field).
    c.model = ml_collections.ConfigDict()
    # 'base' | 'big' | 'tiny' | 'init_from' (the model of config.init_from's workdir; then only
    # the dropout rates and dtype may be overridden).
    c.model.preset = "base"
    c.model.overrides = _model_overrides()

    # Data (fields documented in data/__init__.py).
    c.data = ml_collections.ConfigDict()
    c.data.source = "default"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.source_lang = "en"
    c.data.target_lang = "es"
    c.data.train_prefix = ml_collections.FieldReference(None, field_type=str)
    c.data.dev_prefix = ml_collections.FieldReference(None, field_type=str)
    c.data.test_prefix = ml_collections.FieldReference(None, field_type=str)
    c.data.tfds_name = ml_collections.FieldReference(None, field_type=str)
    c.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.download = False
    c.vocab_size = 8000  # SentencePiece vocabulary shared by source and target
    c.row_length = 128  # packed row length (source and target), EOS included
    c.overlong = "filter"  # 'filter' | 'truncate' training pairs longer than row_length

    # Batch: a token budget per side per optimizer step, over all devices and hosts.
    c.tokens_per_step = 25_000
    c.grad_accum_steps = 1  # micro-batches per step (same total tokens, less memory)

    # Optimizer (section 5.3): Adam, lr = lr_scale * d_model^-0.5 * min(s^-0.5, s * w^-1.5).
    c.lr_scale = 1.0
    c.warmup_steps = 4000
    c.adam_b1 = 0.9
    c.adam_b2 = 0.98
    c.adam_eps = 1e-9
    c.grad_clip_norm = 0.0  # 0 disables clipping
    c.label_smoothing = 0.1
    c.num_train_steps = 100_000  # the last step; with train_minutes > 0, a cap
    # A wall-clock budget (0: off): train as many steps as fit M minutes on this machine, counted
    # from the start (set-up and compilation included), chosen from the speed of the first steps
    # (training/budget.py); warmup and cooldown shrink to fit if needed. A resumed run keeps
    # the number chosen (saved with the checkpoints).
    c.train_minutes = 0.0
    # Fine-tuning: start a new workdir from the parameters of WORKDIR (its newest checkpoint),
    # WORKDIR/best, WORKDIR/averaged or WORKDIR/checkpoints/STEP, with a fresh optimizer and
    # step 0. Same model and tokenizer (copied); used only while the workdir has no checkpoint.
    c.init_from = ml_collections.FieldReference(None, field_type=str)
    # Not in the paper (0 keeps its schedule): scale the rate linearly down to 0 over the last
    # cooldown_steps, for runs with a fixed budget.
    c.cooldown_steps = 0

    # Devices: mesh sizes; data = -1 takes all devices left over.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # Logging, evaluation and checkpoints.
    c.log_every_steps = 100
    c.eval_every_steps = 1000  # dev loss / perplexity
    c.bleu_every_steps = 5000  # dev BLEU / chrF (0: only at the end)
    c.eval_sentences = 0  # dev sentences for BLEU during training (0: all)
    c.eval_tokens_per_batch = 8192
    # Dev BLEU searches like decode.py does by default (SearchConfig holds the paper's values).
    c.beam_size = _SEARCH.beam_size
    c.alpha = _SEARCH.alpha
    c.eval_at_end = True  # dev loss and BLEU after the last step
    c.num_samples = 3  # sample translations printed at each BLEU evaluation
    c.checkpoint_every_steps = 5000
    c.checkpoint_every_minutes = 10.0
    c.keep_checkpoints = 5
    return c
