"""Traced searches kept on disk (``decoding.exported``): a second Translator reads them back
instead of tracing, translates exactly as the traced search, and never reads a stale or broken
file."""

import logging
import os

import jax
import numpy as np
import pytest

import decoding.exported as exported
from decoding.translate import SearchConfig, Translator

LINES = [
    "In the beginning God created the heavens and the earth.",
    "",
    "Jesus wept.",
    *[f"The {n} sons of Israel went out of Egypt with {n + 1} sheep." for n in range(9)],
    " ".join(["And God said, let there be light"] * 3),
]
TOKENS = 96  # several batch shapes


@pytest.fixture(scope="module")
def one_device(tiny_workdir):
    """The tiny model loaded on one device, and that device's mesh (exports are single-device
    programs; the suite's other tests use all 8 simulated devices)."""
    from model import make_mesh
    from workdirs.restore import load

    mesh = make_mesh(devices=jax.devices()[:1])
    model, params, tokenizer = load(tiny_workdir, mesh=mesh)
    return model, params, tokenizer, mesh


def files(directory):
    return sorted(directory.glob(f"*{exported.SUFFIX}"))


def assert_same(got, want):
    assert [[h for h, _ in row] for row in got] == [[h for h, _ in row] for row in want]
    np.testing.assert_allclose(
        [[s for _, s in row] for row in got], [[s for _, s in row] for row in want], atol=1e-5
    )


@pytest.mark.parametrize(
    "search",
    [SearchConfig(beam_size=4, n_best=2), SearchConfig(method="sample", top_k=5, seed=7)],
    ids=["beam4", "sample"],
)
def test_a_second_translator_reads_the_exports_back_instead_of_tracing(
    one_device, tmp_path, monkeypatch, search
):
    model, params, tokenizer, mesh = one_device
    traced = Translator(model, tokenizer, search, tokens_per_batch=TOKENS, mesh=mesh)
    want = traced.translate(params, LINES)

    first = Translator(
        model, tokenizer, search, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path
    )
    assert_same(first.translate(params, LINES), want)
    shapes = {b["inputs"].shape for b in first.batches(LINES)}
    assert len(shapes) > 1
    assert len(files(tmp_path)) == len(shapes)  # one program per batch shape

    def no_tracing(*args, **kwargs):
        raise AssertionError("the search was traced although its export is on disk")

    monkeypatch.setattr(Translator, "_search", no_tracing)
    second = Translator(
        model, tokenizer, search, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path
    )
    assert_same(second.translate(params, LINES), want)
    assert len(files(tmp_path)) == len(shapes)


def test_another_search_or_other_code_gets_its_own_exports(one_device, tmp_path, monkeypatch):
    model, params, tokenizer, mesh = one_device
    beam = SearchConfig(beam_size=4)
    Translator(
        model, tokenizer, beam, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path
    ).translate(params, LINES)
    n = len(files(tmp_path))

    wider = SearchConfig(beam_size=4, alpha=1.0)
    got = Translator(model, tokenizer, wider, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path)
    assert_same(
        got.translate(params, LINES),
        Translator(model, tokenizer, wider, tokens_per_batch=TOKENS, mesh=mesh).translate(
            params, LINES
        ),
    )
    assert len(files(tmp_path)) == 2 * n

    # Any change to the project's source makes new keys.
    monkeypatch.setattr(exported, "_CODE_HASH", "0" * 64)
    Translator(
        model, tokenizer, beam, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path
    ).translate(params, LINES)
    assert len(files(tmp_path)) == 3 * n

    cache, args = exported.ExportedCache(tmp_path), (np.zeros((2, 3), np.int32),)
    assert cache.key("a", args) != cache.key("b", args)
    assert cache.key("a", args) != cache.key("a", (np.zeros((2, 4), np.int32),))
    assert cache.key("a", args) != cache.key("a", (np.zeros((2, 3), np.float32),))


def test_an_unreadable_export_is_made_again(one_device, tmp_path, caplog):
    model, params, tokenizer, mesh = one_device
    search = SearchConfig(method="greedy")
    want = Translator(model, tokenizer, search, tokens_per_batch=TOKENS, mesh=mesh).translate(
        params, LINES
    )
    Translator(
        model, tokenizer, search, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path
    ).translate(params, LINES)
    broken = files(tmp_path)[0]
    broken.write_bytes(b"not an export")

    with caplog.at_level(logging.WARNING, logger="decoding.exported"):
        again = Translator(
            model, tokenizer, search, tokens_per_batch=TOKENS, mesh=mesh, exported=tmp_path
        )
        assert_same(again.translate(params, LINES), want)
    assert any(str(broken) in r.getMessage() for r in caplog.records)
    jax.export.deserialize(bytearray(broken.read_bytes()))  # replaced by a good one
    assert not list(tmp_path.glob("*.tmp"))


def test_a_sharded_translator_traces_as_before(tiny_loaded, tmp_path):
    model, params, tokenizer = tiny_loaded  # on all 8 simulated devices
    search = SearchConfig(method="greedy")
    sharded = Translator(model, tokenizer, search, exported=tmp_path)
    want = Translator(model, tokenizer, search).translate(params, LINES[:4])
    assert_same(sharded.translate(params, LINES[:4]), want)
    assert not files(tmp_path)


def test_the_least_recently_used_exports_go_beyond_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(exported, "MAX_FILES", 2)
    cache = exported.ExportedCache(tmp_path)

    def run(n):  # one program per shape
        return cache(f"ones {n}", lambda x: x + 1, np.zeros((n,), np.float32))

    run(1), run(2)
    first = cache.path(cache.key("ones 1", (np.zeros((1,), np.float32),)))
    os.utime(first, (1, 1))  # as if used long ago ...
    exported.ExportedCache(tmp_path)._load(first.name.removesuffix(exported.SUFFIX))
    assert first.stat().st_mtime > 1  # ... but reading it marks it used
    second = cache.path(cache.key("ones 2", (np.zeros((2,), np.float32),)))
    os.utime(second, (1, 1))
    np.testing.assert_array_equal(run(3), np.ones(3))
    assert sorted(files(tmp_path)) == sorted(
        [first, cache.path(cache.key("ones 3", (np.zeros((3,), np.float32),)))]
    )


def test_an_export_that_cannot_be_saved_still_runs_and_says_where(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    cache = exported.ExportedCache(blocker / "exported")
    with caplog.at_level(logging.WARNING, logger="decoding.exported"):
        got = cache("plus one", lambda x: x + 1, np.zeros((3,), np.float32))
    np.testing.assert_array_equal(got, np.ones(3))
    assert any(
        "cannot save" in r.getMessage() and str(blocker / "exported") in r.getMessage()
        for r in caplog.records
    )
