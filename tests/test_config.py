"""TransformerConfig validation: every invalid setting names its field and value."""

import pytest

from model import TransformerConfig


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 0}, "vocab_size must be a positive int, got 0"),
        ({"d_model": -8}, "d_model must be a positive int, got -8"),
        ({"num_heads": 0}, "num_heads must be a positive int, got 0"),
        ({"d_ff": 0}, "d_ff must be a positive int, got 0"),
        (
            {"num_encoder_layers": 0},
            "num_encoder_layers must be a positive int for architecture='encoder_decoder', got 0",
        ),
        ({"num_decoder_layers": -1}, "num_decoder_layers must be a positive int, got -1"),
        ({"max_positions": 0}, "max_positions must be a positive int, got 0"),
        ({"d_model": 2.5}, "d_model must be a positive int, got 2.5"),
        ({"d_model": 30, "num_heads": 4}, "d_model=30 must be divisible by num_heads=4"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\), got 1.0"),
        ({"dropout_rate": -0.1}, r"dropout_rate must be in \[0, 1\), got -0.1"),
        ({"attention_dropout_rate": 1.5}, r"attention_dropout_rate must be in \[0, 1\), got 1.5"),
        ({"dtype": "float64"}, "dtype must be one of .*, got 'float64'"),
        ({"param_dtype": "int8"}, "param_dtype must be one of .*, got 'int8'"),
        ({"norm": "sandwich"}, "norm must be 'post' or 'pre', got 'sandwich'"),
        ({"positional_encoding": "learned"}, "positional_encoding must be .*, got 'learned'"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon must be > 0, got 0.0"),
        ({"activation": "tanh"}, "activation must be 'relu', 'swish' or 'gelu', got 'tanh'"),
        ({"attention_bias": 1}, "attention_bias must be True or False, got 1"),
        ({"logits_bias": "yes"}, "logits_bias must be True or False, got 'yes'"),
    ],
)
def test_invalid_settings_raise_value_error_naming_field_and_value(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig.tiny(100).replace(**changes)


def test_config_is_frozen_and_round_trips_through_a_dict():
    cfg = TransformerConfig.big(37000, max_positions=256)
    with pytest.raises(AttributeError):
        cfg.d_model = 3  # type: ignore[misc]
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown TransformerConfig fields \['bogus'\]"):
        TransformerConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_replace_validates():
    with pytest.raises(ValueError, match="num_heads=3"):
        TransformerConfig.base(100).replace(num_heads=3)
