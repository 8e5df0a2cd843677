"""train.py and decode.py with the family's halves: configs/lm_tiny.py and configs/mlm_tiny.py
train on the fixture corpus, evaluate what fits them, resume, and the LM continues prompts."""

import collections
import json
import math
import subprocess
import sys

import pytest

import data
import training.loop
from configs.lm_tiny import get_config as lm_config
from configs.mlm_tiny import get_config as mlm_config
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from decoding.continuation import Continuer
from decoding.translate import SearchConfig
from tests.conftest import REPO
from workdirs.restore import load


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train(get_config, workdir, **changes):
    config = get_config()
    config.update(dict(log_every_steps=10, **changes))
    return training.loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm_tiny")
    _train(lm_config, workdir)
    return workdir


def test_lm_trains_with_perplexity_not_bleu(lm_workdir):
    rows = _rows(lm_workdir)
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.15
    dev = [r for r in rows if "dev_ppl" in r]
    assert len(dev) == 2 and all(0 < r["dev_accuracy"] <= 1 for r in dev)
    assert (
        dev[-1]["dev_ppl"] < dev[0]["dev_ppl"] and dev[-1]["dev_accuracy"] > dev[0]["dev_accuracy"]
    )
    assert (lm_workdir / "best").is_dir()  # the lowest dev perplexity's parameters
    assert not any("bleu" in r for r in rows)
    saved = json.loads((lm_workdir / "model_config.json").read_text())
    assert saved["architecture"] == "decoder_only" and saved["num_encoder_layers"] == 0


def test_lm_resumes_where_it_stopped(lm_workdir, tmp_path):
    import shutil

    workdir = tmp_path / "lm"
    shutil.copytree(lm_workdir, workdir)
    _train(lm_config, workdir, num_train_steps=90)
    steps = [r["step"] for r in _rows(workdir) if "loss" in r]
    assert steps[-1] == 90 and steps.count(80) == 1 and steps.count(90) == 1


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_decode_continues_prompts_line_for_line(lm_workdir, tmp_path, method):
    prompts = ["En el principio", "", "Y dijo Dios:", "En el principio"]
    src, dst = tmp_path / "prompts.txt", tmp_path / "out.txt"
    src.write_text("\n".join(prompts) + "\n")
    result = subprocess.run(
        [sys.executable, "decode.py", f"--workdir={lm_workdir}", f"--input={src}",
         f"--output={dst}", f"--method={method}", "--max_new_tokens=12"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dst.read_text().split("\n")[:-1]
    assert len(lines) == len(prompts)
    assert lines[1] == ""  # empty in, empty out
    # What the library gives for the same workdir and search, in the same order.
    model, params, tokenizer = load(lm_workdir)
    search = SearchConfig(method=method, extra_len=12)
    expected = Continuer(model, tokenizer, search).continue_lines(params, prompts)
    assert lines == [nbest[0][0] for nbest in expected]
    if method != "sample":  # the same prompt, the same continuation
        assert lines[0] == lines[3]


def test_continuations_read_back_from_their_exports_are_the_same(lm_workdir, tmp_path, monkeypatch):
    import jax
    import numpy as np

    import decoding.exported as exported
    from model import make_mesh

    def same(got, want):
        assert [[t for t, _ in row] for row in got] == [[t for t, _ in row] for row in want]
        scores = [[[s for _, s in row] for row in x] for x in (got, want)]
        np.testing.assert_allclose(*scores, atol=1e-5)

    mesh = make_mesh(devices=jax.devices()[:1])  # exports are single-device programs
    model, params, tokenizer = load(lm_workdir, mesh=mesh)
    prompts = ["En el principio", "", "Y dijo Dios:", "Y la tierra estaba desordenada"]
    searches = (SearchConfig(beam_size=2, extra_len=6), SearchConfig(method="sample", seed=5))
    wants = []
    for search in searches:
        wants.append(Continuer(model, tokenizer, search, mesh=mesh).continue_lines(params, prompts))
        first = Continuer(model, tokenizer, search, mesh=mesh, exported=tmp_path)
        same(first.continue_lines(params, prompts), wants[-1])
    n = len(list(tmp_path.glob(f"*{exported.SUFFIX}")))
    assert n >= 2 * 2  # at least two prompt lengths per search

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced although the export is on disk")

    monkeypatch.setattr(Continuer, "_search", no_tracing)
    for search, want in zip(searches, wants, strict=True):
        again = Continuer(model, tokenizer, search, mesh=mesh, exported=tmp_path)
        same(again.continue_lines(params, prompts), want)
    assert len(list(tmp_path.glob(f"*{exported.SUFFIX}"))) == n


def _unigram_baseline(workdir, config) -> tuple[float, float]:
    """``(perplexity, accuracy)`` on the dev set's regular tokens of the unigram model of the
    training set's (add-one smoothed): what a masked LM that ignores its context reaches."""
    tokenizer = Tokenizer.load(workdir / "tokenizer.model")

    def ids(split):
        out = []
        for source, target in data.open_split(config.data, split):
            out += tokenizer.encode(source, side="source") + tokenizer.encode(target, side="target")
        return [i for i in out if i not in (PAD_ID, EOS_ID, BOS_ID, UNK_ID)]

    counts, dev = collections.Counter(ids("train")), ids("dev")
    total = sum(counts.values()) + tokenizer.vocab_size
    nll = -sum(math.log((counts[i] + 1) / total) for i in dev) / len(dev)
    most_common = counts.most_common(1)[0][0]
    return math.exp(nll), sum(i == most_common for i in dev) / len(dev)


def test_mlm_learns_beyond_the_unigram_distribution(tmp_path):
    config = mlm_config()
    _train(mlm_config, tmp_path)
    rows = _rows(tmp_path)
    dev = [r for r in rows if "dev_accuracy" in r]
    unigram_ppl, unigram_accuracy = _unigram_baseline(tmp_path, config)
    # Measured (fixture corpus, 80 steps): unigram 264 / 3.4%; the model 217-234 / 6.6-8.4%
    # over two seeds. A model stuck at the unigram distribution fails both.
    assert dev[-1]["dev_ppl"] < 0.95 * unigram_ppl, (dev, unigram_ppl)
    assert dev[-1]["dev_accuracy"] > 1.5 * unigram_accuracy, (dev, unigram_accuracy)
    assert dev[-1]["dev_accuracy"] > dev[0]["dev_accuracy"]
    assert not any("bleu" in r for r in rows)
    saved = json.loads((tmp_path / "model_config.json").read_text())
    assert saved["vocab_size"] == 501  # the tokenizer's 500 plus the mask row
    result = subprocess.run(
        [sys.executable, "decode.py", f"--workdir={tmp_path}", "--input=-"],
        cwd=REPO, capture_output=True, text=True, input="hello\n", timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "encoder-only" in result.stderr and "nothing to generate" in result.stderr


def test_exports_for_translation_engines_refuse_a_language_model(lm_workdir, tmp_path):
    out = tmp_path / "ct2"
    result = subprocess.run(
        [sys.executable, "convert.py", f"--input=workdir:{lm_workdir}",
         f"--output=ctranslate2:{out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "decoder_only model" in result.stderr and not out.exists()
