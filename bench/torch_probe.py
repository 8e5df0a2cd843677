"""The probe model in torch, doing the Flax probe's work: the baseline of ``bench/train_speed.py``.

Like for like with ``TransformerConfig`` at the probe's sizes (post-LN, ReLU, tied and scaled
embeddings, no final LayerNorm after either stack):

- dropout 0.1 where the Flax model drops, and nowhere else: on the embeddings plus positions
  and on each sub-layer's output before its residual. ``torch.nn.Transformer``'s one
  ``dropout`` argument also drops the attention weights and inside the feed-forward layer
  (about 17M more random draws per step, and no fused attention); those two are set to 0 here;
- the paper's sinusoidal positions (the Flax model's own table), added to the scaled embeddings;
- label smoothing 0.1 over the whole vocabulary, Adam, one optimizer step per batch.

Left as torch has them: biases on the attention projections (the Flax probe has none: a few
additions per layer) and LayerNorm's epsilon (1e-5 against 1e-6: no cost).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from model.layers import sinusoidal_positions


def build(d: int, heads: int, d_ff: int, layers: int, vocab: int, length: int):
    """The probe as a ``torch.nn.Module``: ``net(src [B, L], tgt [B, L]) -> logits [B, L, V]``."""
    import torch

    def residual_dropout_only(layer):
        for attention in ("self_attn", "multihead_attn"):
            if hasattr(layer, attention):
                getattr(layer, attention).dropout = 0.0  # the attention weights' dropout
        layer.dropout = torch.nn.Identity()  # between the feed-forward layer's two linears
        return layer

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            self.register_buffer(
                "positions",
                torch.from_numpy(np.asarray(sinusoidal_positions(length, d), np.float32)),
            )
            self.drop = torch.nn.Dropout(0.1)
            kinds = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
            self.encoder, self.decoder = (
                torch.nn.ModuleList(
                    residual_dropout_only(kind(d, heads, d_ff, 0.1, batch_first=True))
                    for _ in range(layers)
                )
                for kind in kinds
            )
            self.register_buffer(
                "causal", torch.nn.Transformer.generate_square_subsequent_mask(length)
            )

        def forward(self, src, tgt):
            scale = d**0.5
            x = self.drop(self.embed(src) * scale + self.positions[: src.shape[1]])
            for layer in self.encoder:
                x = layer(x)
            y = self.drop(self.embed(tgt) * scale + self.positions[: tgt.shape[1]])
            mask = self.causal[: tgt.shape[1], : tgt.shape[1]]
            for layer in self.decoder:
                y = layer(y, x, tgt_mask=mask, tgt_is_causal=True)
            return y @ self.embed.weight.T

    return Probe()


def runner(batch: dict, dims: tuple, *, bf16: bool, compiled: bool) -> Callable[[int], float]:
    """Builds the probe (compiled with ``torch.compile`` or eager, bf16 autocast or float32) and
    returns ``run(steps) -> seconds per step``; the first steps (and compilation) run here."""
    import torch

    torch.manual_seed(0)
    net = build(*dims)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    src, tgt = (torch.from_numpy(batch[k][0]).long() for k in ("inputs", "targets"))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    forward = torch.compile(net) if compiled else net

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(src, tgt)
        loss = loss_fn(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    run(2)  # compilation, and the allocator's first pass
    return run
