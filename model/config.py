"""The model's one configuration: a frozen dataclass with the paper's presets.

Choices the paper leaves open, made here (and documented in the README):
  * LayerNorm epsilon 1e-6 (tensor2tensor, the paper's reference code), with scale and bias.
  * No biases in the attention projections W^Q, W^K, W^V, W^O (the paper's equations have none);
    the feed-forward layers have biases (FFN(x) = max(0, x W1 + b1) W2 + b2, eq. 2).
  * Initialisers: Xavier-uniform for all projection matrices (fan-in/fan-out taken over the
    model dimension and the heads x head-dim dimension), zeros for biases, ones/zeros for
    LayerNorm, and N(0, d_model^-0.5) for the shared embedding so that, once multiplied by
    sqrt(d_model), the embedded tokens have unit variance (as in tensor2tensor).
  * No attention dropout by default (the paper applies dropout only to sub-layer outputs and to
    embeddings + positions); ``attention_dropout_rate`` is there for experiments.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

Norm = Literal["post", "pre"]
Activation = Literal["relu", "swish", "gelu"]
Remat = Literal["none", "dots", "full"]
Architecture = Literal["encoder_decoder", "decoder_only", "encoder_only"]
ARCHITECTURES = ("encoder_decoder", "decoder_only", "encoder_only")
PositionalLayout = Literal["interleaved", "concat"]
_DTYPES = ("float32", "bfloat16", "float16")
# Fields renamed since workdirs were first written: old name -> new name.
_RENAMED = {"max_len": "max_positions"}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a model of the family: the paper's encoder-decoder, or one half.

    Attributes:
      architecture: which blocks are assembled (``model.build_model`` picks the class):
        "encoder_decoder" (``Transformer``, the paper's), "decoder_only" (``DecoderOnlyLM``,
        GPT-style: ``num_encoder_layers`` must be 0) or "encoder_only" (``EncoderOnly``,
        BERT-style: ``num_decoder_layers`` must be 0).
      vocab_size: V, size of the vocabulary shared by source and target (id 0 is padding).
      d_model: D, width of the residual stream and of the embeddings.
      num_heads: H, attention heads; the head dimension is K = D / H.
      d_ff: F, inner width of the position-wise feed-forward network.
      num_encoder_layers: N for the encoder.
      num_decoder_layers: N for the decoder.
      dropout_rate: P_drop on each sub-layer output and on embeddings + positions.
      attention_dropout_rate: dropout on attention probabilities (not in the paper: 0).
      max_positions: the rows of the position table: the longest source, target or decoding
        cache (the training config's ``row_length`` and a cache's length must fit in it).
      dtype: compute dtype ("float32", "bfloat16", "float16"). Matmuls take inputs in this
        dtype and accumulate in float32; LayerNorm statistics and softmax run in float32.
      param_dtype: storage dtype of the parameters.
      norm: "post" is the paper's LayerNorm(x + Dropout(Sublayer(x))); "pre" is
        x + Dropout(Sublayer(LayerNorm(x))) with a final LayerNorm after each stack.
      positional_encoding: "interleaved" is the paper's PE(pos, 2i) = sin, PE(pos, 2i+1) = cos;
        "concat" is tensor2tensor's [sin | cos] halves layout.
      layer_norm_epsilon: epsilon of every LayerNorm.
      activation: the feed-forward non-linearity: "relu" (the paper's max(0, x)), "swish"
        (x * sigmoid(x), Marian/OPUS-MT's) or "gelu" (the exact, erf-based GELU).
      attention_bias: biases on the attention projections W^Q, W^K, W^V, W^O (Marian has them;
        the paper's equations do not).
      logits_bias: a bias added to the output logits (Marian's ``final_logits_bias``).
      scan_layers: run each stack as one ``nn.scan`` over stacked parameters (compiles one
        layer, not N; another parameter layout). See ``model/stacks.py``.
      remat: recompute activations in the backward pass: "none", "dots" (keep the projection
        matmuls' outputs) or "full" (keep each layer's input only).
      num_classes: "encoder_only" only: the size of a classification head over the first
        token's features (0: none).
    """

    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    max_positions: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"
    norm: Norm = "post"
    positional_encoding: PositionalLayout = "interleaved"
    layer_norm_epsilon: float = 1e-6
    activation: Activation = "relu"
    attention_bias: bool = False
    logits_bias: bool = False
    scan_layers: bool = False
    remat: Remat = "none"
    architecture: Architecture = "encoder_decoder"
    num_classes: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        self._check_architecture()
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must be divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.positional_encoding == "concat" and self.d_model % 2:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must be even for positional_encoding="
                "'concat'"
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in _DTYPES:
                raise ValueError(
                    f"TransformerConfig.{name} must be one of {_DTYPES}, got {value!r}"
                )
        if self.norm not in ("post", "pre"):
            raise ValueError(f"TransformerConfig.norm must be 'post' or 'pre', got {self.norm!r}")
        if self.positional_encoding not in ("interleaved", "concat"):
            raise ValueError(
                "TransformerConfig.positional_encoding must be 'interleaved' or 'concat', "
                f"got {self.positional_encoding!r}"
            )
        if self.activation not in ("relu", "swish", "gelu"):
            raise ValueError(
                "TransformerConfig.activation must be 'relu', 'swish' or 'gelu', "
                f"got {self.activation!r}"
            )
        if self.remat not in ("none", "dots", "full"):
            raise ValueError(
                f"TransformerConfig.remat must be 'none', 'dots' or 'full', got {self.remat!r}"
            )
        for name in ("attention_bias", "logits_bias", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TransformerConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"TransformerConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}"
            )

    def _check_architecture(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"TransformerConfig.architecture must be one of {ARCHITECTURES}, "
                f"got {self.architecture!r}"
            )
        # Each side's layer count: positive where the architecture has that stack, else 0.
        wanted = {
            "num_encoder_layers": self.architecture != "decoder_only",
            "num_decoder_layers": self.architecture != "encoder_only",
        }
        for name, present in wanted.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
            if present and value == 0:
                raise ValueError(
                    f"TransformerConfig.{name} must be a positive int for architecture="
                    f"{self.architecture!r}, got 0"
                )
            if not present and value != 0:
                raise ValueError(
                    f"TransformerConfig.{name} must be 0 for architecture={self.architecture!r} "
                    f"(it has no such stack), got {value!r}"
                )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(
                f"TransformerConfig.num_classes must be an int, got {self.num_classes!r}"
            )
        if self.num_classes < 0 or (self.num_classes and self.architecture != "encoder_only"):
            raise ValueError(
                "TransformerConfig.num_classes must be 0, or > 0 with architecture='encoder_only', "
                f"got {self.num_classes!r} with {self.architecture!r}"
            )

    @property
    def head_dim(self) -> int:
        """K, the per-head width of queries, keys and values."""
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> TransformerConfig:
        """Returns a validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def normalised_dict(cls, values: dict) -> dict:
        """A saved config as today's ``to_dict`` would write it: fields added since it was
        written take their defaults (an old workdir resumes and compares equal). Values that
        do not make a valid config are returned as they are, for the caller to report."""
        try:
            return cls.from_dict(values).to_dict()
        except (TypeError, ValueError):
            return dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them. A config saved before
        ``max_positions`` was named so (``max_len``) reads as well."""
        values = dict(values)
        for old, new in _RENAMED.items():
            if old in values and new not in values:
                values[new] = values.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    # Presets. Table 3 of the paper; `tiny` is for tests and smoke runs. Each takes an
    # ``architecture`` override; the stack that architecture lacks then gets 0 layers unless the
    # overrides say otherwise.
    @classmethod
    def _preset(cls, vocab_size: int, values: dict, overrides: dict) -> TransformerConfig:
        merged = {**values, **overrides}
        missing = {"decoder_only": "num_encoder_layers", "encoder_only": "num_decoder_layers"}
        side = missing.get(merged.get("architecture", "encoder_decoder"))
        if side is not None and side not in overrides:
            merged[side] = 0
        return cls(vocab_size=vocab_size, **merged)

    @classmethod
    def base(cls, vocab_size: int, **overrides) -> TransformerConfig:
        """Transformer (base): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1 (~63M params at 37k)."""
        return cls._preset(vocab_size, {}, overrides)

    @classmethod
    def big(cls, vocab_size: int, **overrides) -> TransformerConfig:
        """Transformer (big): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (~213M at 37k)."""
        values = dict(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
        return cls._preset(vocab_size, values, overrides)

    @classmethod
    def tiny(cls, vocab_size: int, **overrides) -> TransformerConfig:
        """A 2+2-layer, d_model=32 model for tests and smoke runs."""
        values = dict(
            d_model=32,
            num_heads=4,
            d_ff=64,
            num_encoder_layers=2,
            num_decoder_layers=2,
            max_positions=128,
        )
        return cls._preset(vocab_size, values, overrides)

    @classmethod
    def gpt2_small(cls, vocab_size: int = 50257, **overrides) -> TransformerConfig:
        """A decoder-only LM shaped like GPT-2 small: 12 pre-LN layers, d_model=768, 12 heads,
        d_ff=3072, GELU, biases on attention, 1,024 positions, tied embedding (~124M params at
        GPT-2's vocabulary; sinusoidal positions where GPT-2 learns a [1024, 768] table)."""
        values = dict(
            architecture="decoder_only",
            d_model=768,
            num_heads=12,
            d_ff=3072,
            num_encoder_layers=0,
            num_decoder_layers=12,
            max_positions=1024,
            norm="pre",
            activation="gelu",
            attention_bias=True,
            layer_norm_epsilon=1e-5,
        )
        return cls._preset(vocab_size, values, overrides)
