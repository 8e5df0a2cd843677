"""A small random OPUS-MT-shaped Hugging Face Marian directory, built locally (no downloads).

Two SentencePiece models (English source, Spanish target) trained on the repository's fixture
corpus, a ``vocab.json`` laid out as OPUS-MT's (``</s>`` 0, ``<unk>`` 1, the pieces of both
models, ``<pad>`` last), and a ``MarianMTModel`` with random weights: every parameter, bias,
LayerNorm and ``final_logits_bias`` perturbed so that no term of the mapping can hide behind a
zero or a one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "bible-en-es-tiny"


def lines(name: str, count: int) -> list[str]:
    return FIXTURE.joinpath(name).read_text(encoding="utf-8").splitlines()[:count]


def _spm(sentences: list[str], vocab_size: int) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    return out.getvalue()


def build(directory: Path, *, activation: str = "swish", seed: int = 0) -> Path:
    """Writes a Marian directory (``save_pretrained`` layout, safetensors) and returns it."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    directory.mkdir(parents=True, exist_ok=True)
    source = _spm(lines("train.en", 400), 160)
    target = _spm(lines("train.es", 400), 180)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(target)
    pieces = []
    for proto in (source, target):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i)]
    vocab = {"</s>": 0, "<unk>": 1, ">>spa<<": 2}  # a target-language token, as multi-target
    # OPUS-MT models have
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"source_lang": "en", "target_lang": "es", "model_max_length": 64})
    )
    size, pad = len(vocab), vocab["<pad>"]
    config = MarianConfig(
        vocab_size=size,
        decoder_vocab_size=size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        activation_function=activation,
        max_position_embeddings=64,
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        decoder_start_token_id=pad,
        dropout=0.1,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(torch.randn_like(p) * (0.3 if "embed" in name or "shared" in name else 0.15))
        model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias) * 0.5)
        # </s>: greedy outputs of 0, 2, 46 and 3 tokens for the tests' sources, not all running
        # to the length limit as random models' outputs tend to.
        model.final_logits_bias[0, 0] += 7.0
    model.generation_config.bad_words_ids = [[pad]]
    model.save_pretrained(directory)
    return directory


def hf_logprobs(model, tokenizer, sources: list[str], targets: list[str]) -> list[np.ndarray]:
    """Per-token log-probabilities of each target (EOS included) under a transformers model."""
    import torch

    batch = tokenizer(sources, text_target=targets, return_tensors="pt", padding=True)
    labels = batch["labels"]
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).logits
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0].numpy()
    lengths = (labels != tokenizer.pad_token_id).sum(-1).numpy()
    return [logp[i, : lengths[i]] for i in range(len(sources))]
