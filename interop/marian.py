"""Reading OPUS-MT / Hugging Face Marian directories as this project's models, without torch.

    bundle = interop.marian.read("opus-mt-en-es")              # config.json, model.safetensors,
                                                               # source.spm, target.spm, vocab.json

This module also holds the layout both directions share (the channel permutation, the Flax ->
Marian module names, the ``"aiayn_jax"`` key); ``interop.marian_export`` writes the other way.

A Marian model is the paper's post-LN Transformer with a few differences, each mapped to a
``TransformerConfig`` option (transformers' ``modeling_marian.py``):

  Marian (config.json / weights)              this project
  activation_function swish | gelu | relu     activation (swish = SiLU; gelu is the erf GELU)
  q/k/v/out_proj.bias                         attention_bias=True: query_bias [H, K], ...,
                                              out_bias [D]
  final_logits_bias [1, V]                    logits_bias=True: embed/logits_bias [V]
  LayerNorm eps 1e-5 (fixed)                  layer_norm_epsilon=1e-5
  max_position_embeddings                     max_positions
  sinusoid with sines in channels [0, D/2),   positional_encoding="interleaved" (the paper's): the
  cosines in [D/2, D), the paper's rates      two tables are one channel permutation apart, so D
                                              is permuted everywhere on import (exact: LayerNorm
                                              and every matmul are blind to channel order)
  ids: </s> 0, <pad> last, start = <pad>      ids permuted so padding is 0 (data.marian_tokenizer)

Linear weights are torch's ``[out, in]``; attention outputs are head-major (``h * K + k``), as
``[D, H, K]`` reshapes. Marian's encoder and decoder share one embedding (``model.shared``), tied
to ``lm_head``; models with separate vocabularies, pre-LN (``normalize_before``) or without
``scale_embedding`` are refused naming the field. ``pytorch_model.bin`` is never unpickled.

An export (``interop.marian_export``) also writes the project's own options into
``config.json`` (``"aiayn_jax"``: the LayerNorm epsilon, and whether the attention and logits
biases exist; transformers ignores the key), so that workdir -> marian -> workdir gives back the
same config and parameters: biases exported as zeros are dropped again on import, unless
training elsewhere made them non-zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.marian_tokenizer import MarianTokenizer, project_to_marian
from interop.bundle import ConversionError, TransformerBundle

log = logging.getLogger("interop")

_ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu"}
OWN_KEY = "aiayn_jax"  # this project's options, in an exported config.json
MARIAN_LAYER_NORM_EPSILON = 1e-5
_EMBEDDING_KEYS = (
    "model.shared.weight",
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
)
# Shared with interop.marian_export: Flax layer module -> Marian sub-module, for each attention
# and each LayerNorm of encoder and decoder layers.
ATTENTIONS = {
    "encoder": {"self_attention": "self_attn"},
    "decoder": {"self_attention": "self_attn", "cross_attention": "encoder_attn"},
}
NORMS = {
    "encoder": {"norm_attention": "self_attn_layer_norm", "norm_ff": "final_layer_norm"},
    "decoder": {
        "norm_self": "self_attn_layer_norm",
        "norm_cross": "encoder_attn_layer_norm",
        "norm_ff": "final_layer_norm",
    },
}


def interleave_channels(d_model: int) -> np.ndarray:
    """``perm`` with ``ours[..., c] = marian[..., perm[c]]``: channel 2i is Marian's i (a sine),
    2i + 1 is Marian's D/2 + i (the cosine of the same rate)."""
    half = np.arange(d_model // 2)
    return np.stack([half, half + d_model // 2], axis=1).reshape(-1)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (is it a Hugging Face Marian directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def _model_config(hf: dict, path: Path):
    """The TransformerConfig of a Marian ``config.json``; refuses what the model cannot do."""
    from model import TransformerConfig

    def need(field, ok, expected):
        if not ok:
            raise ConversionError(
                f"{path}: {field}={hf.get(field)!r} is not supported (expected {expected})"
            )

    need("model_type", hf.get("model_type") == "marian", "'marian'")
    for field in ("d_model", "encoder_layers", "decoder_layers", "vocab_size", "pad_token_id"):
        need(field, isinstance(hf.get(field), int), "an int")
    need("share_encoder_decoder_embeddings", hf.get("share_encoder_decoder_embeddings", True),
         "true: one vocabulary for source and target")  # fmt: skip
    need("decoder_vocab_size", hf.get("decoder_vocab_size") in (None, hf["vocab_size"]),
         f"vocab_size={hf['vocab_size']}")  # fmt: skip
    need("tie_word_embeddings", hf.get("tie_word_embeddings", True), "true")
    need(
        "scale_embedding", hf.get("scale_embedding") is True, "true: embeddings times sqrt(d_model)"
    )
    need("normalize_before", not hf.get("normalize_before", False), "false: Marian is post-LN")
    # Fields older OPUS-MT configs carry from BART: their Marian values, or a model this is not.
    need("normalize_embedding", not hf.get("normalize_embedding", False), "false")
    need("add_final_layer_norm", not hf.get("add_final_layer_norm", False), "false")
    need("static_position_embeddings", hf.get("static_position_embeddings", True),
         "true: the fixed sinusoid")  # fmt: skip
    need("add_bias_logits", not hf.get("add_bias_logits", False), "false")
    need("activation_function", hf.get("activation_function") in _ACTIVATIONS,
         f"one of {sorted(_ACTIVATIONS)}")  # fmt: skip
    heads = hf.get("encoder_attention_heads")
    need("decoder_attention_heads", hf.get("decoder_attention_heads") == heads,
         f"encoder_attention_heads={heads}")  # fmt: skip
    ffn = hf.get("encoder_ffn_dim")
    need("decoder_ffn_dim", hf.get("decoder_ffn_dim") == ffn, f"encoder_ffn_dim={ffn}")
    need("d_model", hf["d_model"] % 2 == 0, "an even width")
    if hf.get("activation_dropout"):
        log.warning("activation_dropout=%s is not modelled (fine-tuning uses none)",
                    hf["activation_dropout"])  # fmt: skip
    ours = hf.get(OWN_KEY, {})
    try:
        return TransformerConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            num_heads=heads,
            d_ff=ffn,
            num_encoder_layers=hf["encoder_layers"],
            num_decoder_layers=hf["decoder_layers"],
            dropout_rate=float(hf.get("dropout", 0.1)),
            attention_dropout_rate=float(hf.get("attention_dropout", 0.0)),
            max_positions=hf.get("max_position_embeddings", 512),
            norm="post",
            positional_encoding="interleaved",
            layer_norm_epsilon=float(ours.get("layer_norm_epsilon", MARIAN_LAYER_NORM_EPSILON)),
            activation=_ACTIVATIONS[hf["activation_function"]],
            attention_bias=True,
            logits_bias=True,
        )
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from None


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({directory / f for f in _read_json(index)["weight_map"].values()})
    else:
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = (
            f"; it has {pickled[0]}, which is a pickle and is never loaded here. Make the "
            'safetensors file on a machine you trust: python -c "from transformers import '
            f"MarianMTModel as M; M.from_pretrained('{directory}').save_pretrained('{directory}')\""
            if pickled
            else ""
        )
        raise ConversionError(f"{single}: missing{hint}")
    weights = {}
    for file in files:
        try:
            weights |= load_file(str(file))
        except Exception as err:  # safetensors raises its own error types for bad headers.
            raise ConversionError(f"{file}: not a readable safetensors file ({err})") from None
    return {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}


def _take(weights: dict, key: str, shape: tuple, where: Path) -> np.ndarray:
    if key not in weights:
        raise ConversionError(f"{where}: missing tensor {key}")
    value = weights.pop(key)
    if value.shape != shape:
        raise ConversionError(f"{where}: {key} has shape {value.shape}, expected {shape}")
    return value


def _embedding(weights: dict, shape: tuple, where: Path) -> np.ndarray:
    found = [k for k in _EMBEDDING_KEYS if k in weights]
    if not found:
        raise ConversionError(f"{where}: no embedding ({' or '.join(_EMBEDDING_KEYS)})")
    first = _take(weights, found[0], shape, where)
    for key in found[1:]:
        if not np.array_equal(_take(weights, key, shape, where), first):
            raise ConversionError(f"{where}: {key} differs from {found[0]}; expected them tied")
    return first


def _params_from_marian(weights: dict, cfg, pad: int, where: Path) -> dict:
    """The Flax params tree from Marian tensors (consumed from ``weights``)."""
    d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    perm = interleave_channels(d)
    rows = project_to_marian(np.arange(v), pad)  # project id -> Marian row

    def linear(name, n_out, n_in):  # torch [out, in] -> [in, out]
        return _take(weights, f"{name}.weight", (n_out, n_in), where).T

    def bias(name, n):
        return _take(weights, f"{name}.bias", (n,), where)

    def attention(name):
        out = {}
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[ours] = linear(f"{name}.{theirs}", d, d)[perm].reshape(d, h, k)
            out[f"{ours}_bias"] = bias(f"{name}.{theirs}", d).reshape(h, k)
        out["out"] = linear(f"{name}.out_proj", d, d)[:, perm].reshape(h, k, d)
        out["out_bias"] = bias(f"{name}.out_proj", d)[perm]
        return out

    def layer(side, i):
        prefix = f"model.{side}.layers.{i}"
        params = {
            ours: attention(f"{prefix}.{theirs}") for ours, theirs in ATTENTIONS[side].items()
        }
        params["feed_forward"] = {
            "wi": linear(f"{prefix}.fc1", f, d)[perm],
            "bi": bias(f"{prefix}.fc1", f),
            "wo": linear(f"{prefix}.fc2", d, f)[:, perm],
            "bo": bias(f"{prefix}.fc2", d)[perm],
        }
        for ours, theirs in NORMS[side].items():
            params[ours] = {
                "scale": _take(weights, f"{prefix}.{theirs}.weight", (d,), where)[perm],
                "bias": _take(weights, f"{prefix}.{theirs}.bias", (d,), where)[perm],
            }
        return params

    embedding = _embedding(weights, (v, d), where)
    logits_bias = weights.pop("final_logits_bias", np.zeros((1, v), np.float32)).reshape(-1)
    params = {"embed": {"embedding": embedding[rows][:, perm], "logits_bias": logits_bias[rows]}}
    for i in range(cfg.num_encoder_layers):
        params[f"encoder_layers_{i}"] = layer("encoder", i)
    for i in range(cfg.num_decoder_layers):
        params[f"decoder_layers_{i}"] = layer("decoder", i)
    for key in ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"):
        weights.pop(key, None)  # Marian's fixed sinusoid: the config's table is the same.
    if weights:
        raise ConversionError(f"{where}: unexpected tensors {sorted(weights)[:5]}")
    return params


def _tokenizer(directory: Path, hf: dict) -> MarianTokenizer:
    tok_config = directory / "tokenizer_config.json"
    settings = _read_json(tok_config) if tok_config.exists() else {}
    if settings.get("separate_vocabs") or (directory / "target_vocab.json").exists():
        raise ConversionError(
            f"{tok_config}: separate_vocabs=true (source and target vocabularies differ) is not "
            "supported; the OPUS-MT models with one vocabulary are"
        )
    special = {t: settings.get(t, d) for t, d in
               (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}  # fmt: skip
    special = {t: (s["content"] if isinstance(s, dict) else s) for t, s in special.items()}
    vocab = _read_json(directory / "vocab.json")
    inverse = {i: p for p, i in vocab.items()} if isinstance(vocab, dict) else {}
    start = hf.get("decoder_start_token_id", hf["pad_token_id"])
    if start not in inverse:
        raise ConversionError(f"{directory / 'config.json'}: decoder_start_token_id={start} is not "
                              f"an id of {directory / 'vocab.json'}")  # fmt: skip
    try:
        tokenizer = MarianTokenizer.from_files(
            directory,
            **special,
            decoder_start_token=inverse[start],
            source_lang=settings.get("source_lang"),
            target_lang=settings.get("target_lang"),
        )
    except DataError as err:
        raise ConversionError(str(err)) from None
    for field, token in (("pad_token_id", "pad_token"), ("eos_token_id", "eos_token")):
        if field in hf and hf[field] != vocab[special[token]]:
            raise ConversionError(
                f"{directory / 'config.json'}: {field}={hf[field]} but {directory / 'vocab.json'}"
                f" has {special[token]!r} at {vocab[special[token]]}"
            )
    return tokenizer


def read(directory: str | Path) -> TransformerBundle:
    """A Hugging Face Marian directory as a bundle (float32 params in the project's layout).

    Raises:
      ConversionError: a missing file, a field or tensor the model cannot represent, a
        vocabulary that does not match the embedding; one line naming the file and field.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory")
    hf_path = directory / "config.json"
    hf = _read_json(hf_path)
    cfg = _model_config(hf, hf_path)
    tokenizer = _tokenizer(directory, hf)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConversionError(
            f"{directory / 'vocab.json'} has {tokenizer.vocab_size} pieces but {hf_path} says "
            f"vocab_size={cfg.vocab_size}: they do not belong together"
        )
    weights = _read_weights(directory)
    params = _params_from_marian(weights, cfg, tokenizer.marian_pad, directory)
    cfg, params = _drop_exported_zeros(cfg, params, hf.get(OWN_KEY, {}))
    return TransformerBundle(cfg, params, tokenizer, None, f"{directory} (Marian)")


def _attention_modules(params: dict):
    for layer in params.values():
        for module in layer.values():
            if isinstance(module, dict) and "query" in module:
                yield module


def _drop_exported_zeros(cfg, params: dict, ours: dict):
    """Removes the biases an export added as zeros to a model without them (``"aiayn_jax"``)."""
    places = {
        "attention_bias": [(m, f"{n}_bias") for m in _attention_modules(params)
                           for n in ("query", "key", "value", "out")],
        "logits_bias": [(params["embed"], "logits_bias")],
    }  # fmt: skip
    for field, found in places.items():
        if ours.get(field, True) or any(np.any(module[key]) for module, key in found):
            continue
        for module, key in found:
            del module[key]
        cfg = cfg.replace(**{field: False})
    return cfg, params
