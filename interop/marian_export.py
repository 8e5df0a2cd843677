"""Writing this project's models as Hugging Face Marian (OPUS-MT) directories, without torch.

    interop.marian_export.write(bundle, "out-dir")   # config.json, generation_config.json,
                                                     # model.safetensors, source.spm, target.spm,
                                                     # vocab.json, tokenizer_config.json

The inverse of ``interop.marian.read``: the same field and tensor mapping (its module docstring),
undone. Channels are permuted back to Marian's sinusoid layout and ids back to Marian's (``</s>``
0, ``<pad>`` last); biases the model lacks are written as zeros, and ``"aiayn_jax"`` in
``config.json`` records that they were absent, so that reading the export gives back the model.
Models Marian cannot express (pre-LN, tensor2tensor's ``concat`` sinusoid, an odd width) are
refused before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from data.marian_tokenizer import MarianTokenizer, marian_to_project
from interop.bundle import (
    ConversionError,
    TransformerBundle,
    check_new_output,
    staged_directory,
)
from interop.marian import (
    ATTENTIONS,
    MARIAN_LAYER_NORM_EPSILON,
    NORMS,
    OWN_KEY,
    interleave_channels,
)

log = logging.getLogger("interop")


def _check_writable(cfg) -> None:
    if cfg.norm != "post":
        raise ConversionError("--output=marian: norm='pre' cannot be expressed (Marian is post-LN)")
    if cfg.positional_encoding != "interleaved":
        raise ConversionError(
            f"--output=marian: positional_encoding={cfg.positional_encoding!r} cannot be expressed"
            " (Marian's sinusoid has the paper's rates; 'concat' uses tensor2tensor's)"
        )
    if cfg.d_model % 2:
        raise ConversionError(f"--output=marian: d_model={cfg.d_model} must be even")
    if cfg.layer_norm_epsilon != MARIAN_LAYER_NORM_EPSILON:
        log.warning(
            "transformers' Marian uses LayerNorm epsilon %g; this model has %g, so its "
            "log-probabilities there differ slightly (about 1e-5 for models trained here)",
            MARIAN_LAYER_NORM_EPSILON,
            cfg.layer_norm_epsilon,
        )


def _marian_tokenizer(bundle: TransformerBundle) -> MarianTokenizer:
    """The bundle's tokenizer as a Marian one; a project tokenizer becomes source.spm =
    target.spm = its SentencePiece model, with vocab.json its ids."""
    tok = bundle.tokenizer
    if isinstance(tok, MarianTokenizer):
        return tok
    if bundle.tokenizer_path is None:
        raise ConversionError(f"{bundle.description}: the tokenizer's model file is unknown")
    proto = Path(bundle.tokenizer_path).read_bytes()
    pieces = bundle.pieces()
    return MarianTokenizer(
        proto,
        proto,
        {p: i for i, p in enumerate(pieces)},
        pad_token=pieces[tok.pad_id],
        eos_token=pieces[tok.eos_id],
        unk_token=pieces[tok.unk_id],
        decoder_start_token=pieces[tok.bos_id],
    )


def _hf_config(cfg, tok: MarianTokenizer) -> dict:
    pad = tok.marian_pad
    eos = tok.vocab[tok.special_tokens["eos_token"]]
    start = tok.vocab[tok.decoder_start_token]
    return {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "activation_function": cfg.activation,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.num_encoder_layers,
        "decoder_layers": cfg.num_decoder_layers,
        "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_positions,
        "dropout": cfg.dropout_rate,
        "attention_dropout": cfg.attention_dropout_rate,
        "activation_dropout": 0.0,
        "scale_embedding": True,
        "share_encoder_decoder_embeddings": True,
        "tie_word_embeddings": True,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "forced_eos_token_id": eos,
        "decoder_start_token_id": start,
        "is_encoder_decoder": True,
        "torch_dtype": "float32",
        OWN_KEY: {
            "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "attention_bias": cfg.attention_bias,
            "logits_bias": cfg.logits_bias,
        },
    }


def _marian_tensors(params: dict, cfg, pad: int) -> dict[str, np.ndarray]:
    """Marian tensors from the Flax params tree (the inverse of ``interop.marian``'s reading)."""
    d, v = cfg.d_model, cfg.vocab_size
    inverse = np.argsort(interleave_channels(d))  # marian[..., j] = ours[..., inverse[j]]
    rows = marian_to_project(np.arange(v), pad)  # Marian row -> project id
    out = {}

    def zeros_if_absent(tree, key, shape):
        return tree[key] if key in tree else np.zeros(shape, np.float32)

    def attention(name, p):
        h, k = p["query"].shape[1:]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{name}.{theirs}.weight"] = p[ours].reshape(d, h * k)[inverse].T
            out[f"{name}.{theirs}.bias"] = zeros_if_absent(p, f"{ours}_bias", (h, k)).reshape(-1)
        out[f"{name}.out_proj.weight"] = p["out"].reshape(h * k, d)[:, inverse].T
        out[f"{name}.out_proj.bias"] = zeros_if_absent(p, "out_bias", (d,))[inverse]

    for side, count in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(count):
            p, prefix = params[f"{side}_layers_{i}"], f"model.{side}.layers.{i}"
            for ours, theirs in ATTENTIONS[side].items():
                attention(f"{prefix}.{theirs}", p[ours])
            ff = p["feed_forward"]
            out[f"{prefix}.fc1.weight"] = ff["wi"][inverse].T
            out[f"{prefix}.fc1.bias"] = ff["bi"]
            out[f"{prefix}.fc2.weight"] = ff["wo"][:, inverse].T
            out[f"{prefix}.fc2.bias"] = ff["bo"][inverse]
            for ours, theirs in NORMS[side].items():
                out[f"{prefix}.{theirs}.weight"] = p[ours]["scale"][inverse]
                out[f"{prefix}.{theirs}.bias"] = p[ours]["bias"][inverse]
    embed = params["embed"]
    out["model.shared.weight"] = embed["embedding"][rows][:, inverse]
    out["final_logits_bias"] = zeros_if_absent(embed, "logits_bias", (v,))[rows][None, :]
    return {k: np.ascontiguousarray(x, dtype=np.float32) for k, x in out.items()}


def check_output(path: str | Path, force: bool) -> None:
    """The check ``write`` makes before anything is read or written (fast, for the CLI)."""
    check_new_output(path, force)


def write(bundle: TransformerBundle, output: str | Path, *, force: bool = False) -> Path:
    """Writes a directory ``MarianMTModel`` and ``MarianTokenizer.from_pretrained`` load.

    Raises:
      ConversionError: the model has an option Marian cannot express, or ``output`` exists
        and ``force`` is False.
    """
    from safetensors.numpy import save_file

    cfg = bundle.config
    _check_writable(cfg)
    tok = _marian_tokenizer(bundle)
    tensors = _marian_tensors(bundle.params, cfg, tok.marian_pad)
    eos, pad = tok.vocab[tok.special_tokens["eos_token"]], tok.marian_pad
    with staged_directory(output, force) as stage:
        save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(_hf_config(cfg, tok), indent=2) + "\n")
        generation = {
            "bad_words_ids": [[pad]],
            "decoder_start_token_id": tok.vocab[tok.decoder_start_token],
            "eos_token_id": eos,
            "forced_eos_token_id": eos,
            "pad_token_id": pad,
            "max_length": cfg.max_positions,
            "num_beams": 4,
        }
        (stage / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tok.save_hf(stage, model_max_length=cfg.max_positions)
    log.info("wrote Marian model %s from %s", output, bundle.description)
    return Path(output)
