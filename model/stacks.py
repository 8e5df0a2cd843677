"""How a stack of N identical layers is built, for compile time and memory of big models.

Two options of ``TransformerConfig``, neither changing what the model computes:

* ``scan_layers``: one ``nn.scan`` over parameters stacked on a leading ``layers`` axis, so XLA
  compiles one layer instead of N (compile time stops growing with depth). The parameter tree
  changes shape (``encoder_layers/...`` ``[N, ...]`` instead of ``encoder_layers_0/...``), so
  a checkpoint is for one setting or the other.
* ``remat``: rematerialisation of each layer's activations in the backward pass. ``"none"``
  keeps them all (fastest, most memory), ``"dots"`` keeps only the matmul outputs without a
  batch dimension (the projections; attention scores and element-wise results are recomputed),
  ``"full"`` keeps only each layer's input (least memory, about one more forward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,  # jax.checkpoint's default: save nothing but the inputs
}


def _remat(cls, config, static_argnums: tuple[int, ...]):
    if config.remat == "none":
        return cls
    # static_argnums count the module itself, as flax.linen.remat expects.
    return nn.remat(cls, policy=REMAT_POLICIES[config.remat], static_argnums=static_argnums)


def layer_stack(cls, config, count: int, static_argnums: tuple[int, ...], **fields):
    """``count`` layers of ``cls(config)``, to assign to a module attribute in ``setup``.

    Args:
      cls: the layer class; its ``__call__(x, *args)`` returns the new ``x``.
      config: the TransformerConfig (``scan_layers``, ``remat``).
      count: N.
      static_argnums: the positions of ``__call__``'s non-array arguments (``deterministic``),
        counting the module itself as 0.
      **fields: other fields of ``cls`` (``DecoderLayer``'s ``cross``).

    Returns:
      A list of modules (named ``ATTR_0``, ``ATTR_1``, ... by Flax) or, with
      ``config.scan_layers``, one scanned module (named ``ATTR``); either way
      ``run_stack(stack, x, *args)`` applies it.
    """
    body = _remat(cls, config, static_argnums)
    if not config.scan_layers:
        return [body(config, **fields) for _ in range(count)]
    scanned = nn.scan(
        _carry(body),
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=count,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, **fields)


def _carry(cls):
    """``cls`` with ``__call__(x, *args) -> (x, None)``, the signature nn.scan runs."""

    class Carried(cls):
        def __call__(self, x, *args):
            return super().__call__(x, *args), None

    Carried.__name__ = cls.__name__
    return Carried


def run_stack(stack, x, *args):
    """Applies a ``layer_stack`` to ``x``; ``args`` are the same for every layer."""
    if isinstance(stack, Sequence):
        for layer in stack:
            x = layer(x, *args)
        return x
    return stack(x, *args)[0]


def unstacked(parent: nn.Module, cls, config, name: str, count: int, **fields) -> list[Any]:
    """The layers of ``parent``'s stack attribute ``name`` as separate modules, for per-layer
    methods (decoding steps).

    Without ``scan_layers`` these are the stack's own modules. With it, each is ``cls(config)``
    bound to slice i of the stacked parameters (``fields`` as for ``layer_stack``).
    """
    if not config.scan_layers:
        return list(getattr(parent, name))
    stacked = nn.unbox(parent.variables["params"][name])
    return [
        cls(config, **fields, parent=None).bind(
            {"params": jax.tree.map(lambda a, i=i: a[i], stacked)}
        )
        for i in range(count)
    ]
