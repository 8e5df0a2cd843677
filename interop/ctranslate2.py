"""Export to CTranslate2: a model directory CTranslate2's ``Translator`` loads.

    bundle = interop.workdir_format.read_workdir("runs/default")
    interop.ctranslate2.export(bundle, "runs/default-ct2", quantization="int8")

Translating with the export as ``decode.py`` does is ``interop.ctranslate2_run``'s job.

The model is described with CTranslate2's spec API: ``TransformerSpec.from_config`` filled with
NumPy arrays inside a ``ctranslate2.converters.Converter``. CT2 linear weights are ``[out, in]``;
a projection's output features are ordered head-major (``h * K + k``), as ``[D, H, K]`` reshapes.

  Flax parameter (shape)                      CTranslate2 variable (shape)
  embed/embedding [V, D]                      encoder/embeddings_0, decoder/embeddings and
                                              decoder/projection (one array, aliased on save),
                                              scale_embeddings: multiplied by sqrt(D)
  sinusoidal_positions(max_positions, D, layout)    {encoder,decoder}/position_encodings/encodings
                                              (CT2's own sinusoid is [sin | cos] from position
                                              1, 500 rows: neither project layout)
  self_attention query, key, value [D, H, K]  self_attention/linear_0 [3D, D] (q, k, v fused)
  cross_attention query [D, H, K]             attention/linear_0 [D, D]
  cross_attention key, value [D, H, K]        attention/linear_1 [2D, D] (k, v fused)
  *_attention out [H, K, D]                   self_attention/linear_1, attention/linear_2 [D, D]
  feed_forward wi [D, F], bi [F]              ffn/linear_0 weight [F, D], bias [F]
  feed_forward wo [F, D], bo [D]              ffn/linear_1 weight [D, F], bias [D]
  norm_attention | norm_self, norm_cross,     self_attention/layer_norm, attention/layer_norm,
  norm_ff (scale, bias [D])                   ffn/layer_norm (gamma, beta [D])
  encoder_norm, decoder_norm (pre-LN only)    {encoder,decoder}/layer_norm
  layer_norm_epsilon                          config.json layer_norm_epsilon (else CT2 uses 1e-5)

  attention_bias: query_bias, key_bias,       the biases of the same linears (fused the same way)
  value_bias [H, K], out_bias [D]
  logits_bias: embed/logits_bias [V]          decoder/projection bias
  activation relu | swish | gelu              spec activation RELU | SWISH | GELU (erf)

The vocabulary is the pieces of ids 0..V-1; the decoder starts from the tokenizer's start piece
(BOS, or ``<pad>`` for an imported Marian model); sources are the pieces followed by ``</s>``,
which callers append (``interop.ctranslate2_run.source_tokens``), as the project does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from ctranslate2.converters import Converter
from ctranslate2.specs import common_spec, transformer_spec
from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES, visit_spec

from interop.bundle import ConversionError, TransformerBundle, check_new_output, staged_directory

log = logging.getLogger("interop")

QUANTIZATIONS = ACCEPTED_MODEL_TYPES  # int8, int8_float32, ..., int16, float16, bfloat16, float32
_BFLOAT16 = ("bfloat16", "int8_bfloat16")
_ACTIVATIONS = {
    "relu": common_spec.Activation.RELU,
    "swish": common_spec.Activation.SWISH,
    "gelu": common_spec.Activation.GELU,
}


def check_quantization(quantization: str | None) -> None:
    """Raises ConversionError unless CTranslate2 knows ``quantization`` (None: float32)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConversionError(
            f"--quantization={quantization} is not a CTranslate2 quantization; "
            f"known: {', '.join(QUANTIZATIONS)}"
        )


def check_expressible(bundle: TransformerBundle) -> None:
    """Raises ConversionError if CTranslate2's Transformer cannot represent the model."""
    cfg = bundle.config
    if cfg.norm not in ("post", "pre"):
        raise ConversionError(f"norm={cfg.norm!r} has no CTranslate2 equivalent (post or pre)")
    pieces = bundle.pieces()
    if len(set(pieces)) != len(pieces):
        raise ConversionError("the tokenizer has duplicate pieces; CTranslate2 maps tokens by name")


class _Params:
    """Read access to the params tree that remembers what was read, to catch unmapped ones."""

    def __init__(self, tree: dict[str, Any]):
        self._tree, self._read = tree, set()

    def __call__(self, *path: str) -> np.ndarray:
        node = self._tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise ConversionError(f"the parameters have no {'/'.join(path)}")
            node = node[key]
        self._read.add(path)
        return np.array(node, dtype=np.float32, order="C")  # A copy: CT2 quantizes in place.

    def has(self, *path: str) -> bool:
        node = self._tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    def unread(self) -> list[str]:
        def leaves(node, prefix):
            if isinstance(node, dict):
                for key, child in node.items():
                    yield from leaves(child, (*prefix, key))
            else:
                yield prefix

        return ["/".join(p) for p in leaves(self._tree, ()) if p not in self._read]


def _in_proj(w: np.ndarray) -> np.ndarray:
    """``[D, H, K]`` -> CT2 ``[H*K, D]``."""
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _out_proj(w: np.ndarray) -> np.ndarray:
    """``[H, K, D]`` -> CT2 ``[D, H*K]``."""
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)


def _set_norm(spec, p: _Params, *path: str) -> None:
    spec.gamma, spec.beta = p(*path, "scale"), p(*path, "bias")


def _set_ffn(spec, p: _Params, layer: str) -> None:
    spec.linear_0.weight = np.ascontiguousarray(p(layer, "feed_forward", "wi").T)
    spec.linear_0.bias = p(layer, "feed_forward", "bi")
    spec.linear_1.weight = np.ascontiguousarray(p(layer, "feed_forward", "wo").T)
    spec.linear_1.bias = p(layer, "feed_forward", "bo")
    _set_norm(spec.layer_norm, p, layer, "norm_ff")


def _set_linear(spec, p: _Params, layer: str, module: str, names: tuple[str, ...]) -> None:
    """One CT2 linear from one or more (fused) projections, with their biases if any."""
    if names == ("out",):
        spec.weight = _out_proj(p(layer, module, "out"))
    else:
        spec.weight = np.concatenate([_in_proj(p(layer, module, n)) for n in names], axis=0)
    if p.has(layer, module, f"{names[0]}_bias"):
        biases = [p(layer, module, f"{n}_bias").reshape(-1) for n in names]
        spec.bias = np.concatenate(biases)


def _set_self_attention(spec, p: _Params, layer: str, norm: str) -> None:
    _set_linear(spec.linear[0], p, layer, "self_attention", ("query", "key", "value"))
    _set_linear(spec.linear[1], p, layer, "self_attention", ("out",))
    _set_norm(spec.layer_norm, p, layer, norm)


def _set_cross_attention(spec, p: _Params, layer: str) -> None:
    _set_linear(spec.linear[0], p, layer, "cross_attention", ("query",))
    _set_linear(spec.linear[1], p, layer, "cross_attention", ("key", "value"))
    _set_linear(spec.linear[2], p, layer, "cross_attention", ("out",))
    _set_norm(spec.layer_norm, p, layer, "norm_cross")


def make_spec(bundle: TransformerBundle) -> transformer_spec.TransformerSpec:
    """The CTranslate2 TransformerSpec of a bundle, float32 (see the module docstring).

    Raises:
      ConversionError: the model has a parameter with no place in the spec, or misses one.
    """
    from model.layers import sinusoidal_positions  # JAX: only where a model is exported.

    check_expressible(bundle)
    cfg, p = bundle.config, _Params(bundle.params)
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.num_encoder_layers, cfg.num_decoder_layers),
        cfg.num_heads,
        pre_norm=cfg.norm == "pre",
        activation=_ACTIVATIONS[cfg.activation],
    )
    pieces, tok = bundle.pieces(), bundle.tokenizer
    spec.config.layer_norm_epsilon = float(cfg.layer_norm_epsilon)
    spec.config.unk_token = pieces[tok.unk_id]
    spec.config.bos_token = pieces[tok.bos_id]
    spec.config.eos_token = pieces[tok.eos_id]
    spec.config.decoder_start_token = pieces[tok.bos_id]
    spec.config.add_source_bos = spec.config.add_source_eos = False

    embedding = p("embed", "embedding")  # [V, D]
    table = sinusoidal_positions(cfg.max_positions, cfg.d_model, cfg.positional_encoding)
    for side in (spec.encoder, spec.decoder):
        side.scale_embeddings = True  # x sqrt(D), then + positions, as Transformer._embed
        side.position_encodings.encodings = np.array(table, np.float32)  # [max_positions, D]
    spec.encoder.embeddings[0].weight = embedding
    spec.decoder.embeddings.weight = embedding.copy()  # Equal arrays are aliased on save.
    spec.decoder.projection.weight = embedding.copy()  # tied: logits = y E^T (+ bias)
    if cfg.logits_bias:
        spec.decoder.projection.bias = p("embed", "logits_bias")

    for i, layer in enumerate(spec.encoder.layer):
        _set_self_attention(layer.self_attention, p, f"encoder_layers_{i}", "norm_attention")
        _set_ffn(layer.ffn, p, f"encoder_layers_{i}")
    for i, layer in enumerate(spec.decoder.layer):
        _set_self_attention(layer.self_attention, p, f"decoder_layers_{i}", "norm_self")
        _set_cross_attention(layer.attention, p, f"decoder_layers_{i}")
        _set_ffn(layer.ffn, p, f"decoder_layers_{i}")
    if cfg.norm == "pre":
        _set_norm(spec.encoder.layer_norm, p, "encoder_norm")
        _set_norm(spec.decoder.layer_norm, p, "decoder_norm")
    unread = p.unread()
    if unread:
        raise ConversionError(
            f"parameters with no CTranslate2 counterpart: {', '.join(unread[:5])}"
            + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        )
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    return spec


class BundleConverter(Converter):
    """A ``ctranslate2.converters.Converter`` for a TransformerBundle.

    Args:
      bundle: the model.
      quantization: the quantization ``convert`` will be called with. CTranslate2 casts to
        bfloat16 with PyTorch; without it, the arrays are cast here with ``ml_dtypes``.
    """

    def __init__(self, bundle: TransformerBundle, quantization: str | None = None):
        self.bundle, self.quantization = bundle, quantization
        self._spec = None

    def spec(self) -> transformer_spec.TransformerSpec:
        """The filled spec, built once (so that errors come before anything is written)."""
        if self._spec is None:
            spec = make_spec(self.bundle)
            if self.quantization in _BFLOAT16:
                import ml_dtypes

                def cast(layer, name, value):
                    key = name.split("/")[-1]
                    if self.quantization == "int8_bfloat16" and hasattr(layer, f"{key}_scale"):
                        return  # Quantized to int8 from float32 by CT2.
                    if isinstance(value, np.ndarray) and value.dtype == np.float32:
                        setattr(layer, key, value.astype(ml_dtypes.bfloat16))

                visit_spec(spec, cast)
            path = self.bundle.tokenizer_path
            if path is not None and path.is_file():
                spec.register_file(str(path), "tokenizer.model")
            for name in ("source.spm", "target.spm"):  # an imported Marian tokenizer's
                path = getattr(self.bundle.tokenizer, "files", {}).get(name)
                if path is not None and path.is_file():
                    spec.register_file(str(path), name)
            self._spec = spec
        return self._spec

    def _load(self):
        return self.spec()


def check_output(output: str | Path, force: bool = False, quantization: str | None = None):
    """The checks ``export`` makes before anything is read or written (fast, for the CLI)."""
    check_quantization(quantization)
    check_new_output(output, force)


def export(
    bundle: TransformerBundle,
    output: str | Path,
    *,
    quantization: str | None = None,
    force: bool = False,
) -> Path:
    """Writes a CTranslate2 model directory (``model.bin``, ``config.json``,
    ``shared_vocabulary.json``, and the tokenizer as ``tokenizer.model``).

    The directory is written beside ``output`` and renamed into place when complete.

    Args:
      bundle: the model.
      output: the directory to create.
      quantization: weight type (``QUANTIZATIONS``); None keeps float32.
      force: replace an existing ``output``.

    Returns:
      ``output`` as a Path.

    Raises:
      ConversionError: bad quantization, existing output without ``force``, or a model CT2
        cannot represent; nothing is written then.
    """
    check_output(output, force, quantization)
    converter = BundleConverter(bundle, quantization)
    converter.spec()  # Build (and check) the spec before touching the disk.
    with staged_directory(output, force) as stage:
        converter.convert(str(stage), quantization=quantization, force=True)  # Fills `stage`.
    log.info("wrote %s (%s) from %s", output, quantization or "float32", bundle.description)
    return Path(output)
