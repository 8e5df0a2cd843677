"""An independent NumPy implementation of the paper's post-LN Transformer, for cross-checks.

Written from the paper's equations, sharing nothing with ``model/`` but the parameter tree it
reads (so the same weights can be fed to both). float64 throughout.
"""

import numpy as np


def positional_encoding(length, d_model):
    pe = np.zeros((length, d_model))
    for pos in range(length):
        for i in range(0, d_model, 2):
            angle = pos / 10000 ** (i / d_model)
            pe[pos, i] = np.sin(angle)
            if i + 1 < d_model:
                pe[pos, i + 1] = np.cos(angle)
    return pe


def layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def multi_head(xq, xkv, p, allowed):
    """xq [Tq, D], xkv [Tk, D], allowed [Tq, Tk] bool -> [Tq, D]; one sentence, no batch."""
    d, h, k = p["query"].shape
    wq, wk, wv = (p[n].reshape(d, h * k) for n in ("query", "key", "value"))
    wo = p["out"].reshape(h * k, d)
    heads = []
    for i in range(h):
        cols = slice(i * k, (i + 1) * k)
        q, kk, v = xq @ wq[:, cols], xkv @ wk[:, cols], xkv @ wv[:, cols]
        scores = q @ kk.T / np.sqrt(k)
        scores = np.where(allowed, scores, -np.inf)
        heads.append(softmax(scores) @ v)
    return np.concatenate(heads, axis=-1) @ wo


def ffn(x, p):
    return np.maximum(0, x @ p["wi"] + p["bi"]) @ p["wo"] + p["bo"]


def transformer(params, src, tgt, num_layers, eps=1e-6):
    """src [S], tgt [T] (decoder input) int ids without padding -> logits [T, V]."""
    params = _to_float64(params)
    emb = params["embed"]["embedding"]
    d = emb.shape[1]
    x = emb[src] * np.sqrt(d) + positional_encoding(len(src), d)
    everything = np.ones((len(src), len(src)), bool)
    for i in range(num_layers[0]):
        p = params[f"encoder_layers_{i}"]
        x = layer_norm(
            x + multi_head(x, x, p["self_attention"], everything), p["norm_attention"], eps
        )
        x = layer_norm(x + ffn(x, p["feed_forward"]), p["norm_ff"], eps)
    y = emb[tgt] * np.sqrt(d) + positional_encoding(len(tgt), d)
    causal = np.tril(np.ones((len(tgt), len(tgt)), bool))
    cross = np.ones((len(tgt), len(src)), bool)
    for i in range(num_layers[1]):
        p = params[f"decoder_layers_{i}"]
        y = layer_norm(y + multi_head(y, y, p["self_attention"], causal), p["norm_self"], eps)
        y = layer_norm(y + multi_head(y, x, p["cross_attention"], cross), p["norm_cross"], eps)
        y = layer_norm(y + ffn(y, p["feed_forward"]), p["norm_ff"], eps)
    return y @ emb.T


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
