"""The Translator's fast path (per-sentence cross-attention keys/values, few batch shapes,
asynchronous batches) translates exactly as the plain search over the uncached decoder."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from data import decoding_batches, restore_order
from decoding import beam_search, greedy_search, uncached_decoder
from decoding.translate import SearchConfig, Translator

LINES = [
    "In the beginning God created the heavens and the earth.",
    "",
    "Jesus wept.",
    " ".join(["And God said, let there be light"] * 12),  # truncated to the model's max_positions
    "The Lord is my shepherd; I shall lack nothing.",
    *[f"The {n} sons of Israel went out of Egypt with {n + 1} sheep." for n in range(23)],
    "Amen.",
]


def reference(model, params, tokenizer, translator, search: SearchConfig):
    """Each batch decoded by the generic search over ``uncached_decoder`` (the whole decoder
    re-run over the prefix at every step, every cache leaf tiled and gathered per beam)."""
    indices, outputs = [], []

    @functools.partial(jax.jit, static_argnums=3)  # one program per batch shape and length
    def run(params, src, limits, length):
        fn, cache = uncached_decoder(model, {"params": params}, src, length)
        common = dict(
            batch_size=src.shape[0], bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
            max_len=length, max_lengths=limits,
        )  # fmt: skip
        if search.method == "greedy":
            return greedy_search(fn, cache, **common)[0][:, None], None
        return beam_search(
            fn, cache, beam_size=search.beam_size, alpha=search.alpha,
            n_best=search.n_best, stopping=search.stopping, **common,
        )  # fmt: skip

    for batch in translator.batches(LINES):
        src = batch["inputs"]
        length, limits = translator.output_limits(src)
        ids, scores = run(params, src, limits, length)
        rows = []
        for r in range(src.shape[0]):
            if batch["index"][r] < 0:
                rows.append(None)
                continue
            texts = tokenizer.decode_batch(np.asarray(ids[r]).tolist())
            rows.append((texts, None if scores is None else np.asarray(scores[r])))
        indices.append(batch["index"])
        outputs.append(rows)
    return restore_order(indices, outputs, len(LINES))


@pytest.mark.parametrize(
    "search",
    [
        SearchConfig(beam_size=4, alpha=0.6, n_best=2),
        SearchConfig(beam_size=4, alpha=0.6, n_best=2, stopping="count"),
        SearchConfig(method="greedy"),
    ],
    ids=["beam4", "beam4-count", "greedy"],
)
def test_translator_equals_the_plain_uncached_search(tiny_loaded, search):
    model, params, tokenizer = tiny_loaded
    translator = Translator(model, tokenizer, search, tokens_per_batch=192)
    assert len({b["inputs"].shape for b in translator.batches(LINES)}) > 1  # several shapes
    fast = translator.translate(params, LINES)
    slow = reference(model, params, tokenizer, translator, search)
    for i, (got, (texts, scores)) in enumerate(zip(fast, slow, strict=True)):
        if not LINES[i].strip():
            assert [h for h, _ in got] == [""] * search.n_best
            continue
        assert [h for h, _ in got] == texts, i
        if scores is not None:
            np.testing.assert_allclose([s for _, s in got], scores, atol=1e-4)


def test_decoding_batches_have_few_shapes_and_keep_every_sentence(tiny_loaded):
    _, _, tokenizer = tiny_loaded
    lines = [" ".join(["word"] * (n % 37)) for n in range(500)]
    batches = decoding_batches(lines, tokenizer, max_tokens=64, tokens_per_batch=512)
    widths = sorted({b["inputs"].shape[1] for b in batches})
    shapes = {b["inputs"].shape for b in batches}
    assert len(shapes) <= len(widths) + 1  # one shape per width, plus the last batch
    for b in batches:
        rows = b["inputs"].shape[0]
        assert rows & (rows - 1) == 0  # a power of two
        real = b["index"] >= 0
        assert np.all(b["inputs"][~real] == 0)
        # Sorted by length inside a batch: sentences that finish together.
        n = (b["inputs"][real] > 0).sum(1)
        assert np.all(np.diff(n) >= 0)
    assert sum(int((b["index"] >= 0).sum()) for b in batches) == len(lines)
    order = restore_order([b["index"] for b in batches], [b["index"] for b in batches], 500)
    assert order == list(range(500))


def test_sampling_keys_differ_across_chunks(tiny_loaded):
    model, params, tokenizer = tiny_loaded
    sampler = Translator(model, tokenizer, SearchConfig(method="sample", seed=3))
    line = ["In the beginning God created the heavens and the earth."]
    first = sampler.translate(params, line, first_line=0)
    again = sampler.translate(params, line, first_line=0)
    later = [sampler.translate(params, line, first_line=n)[0][0][0] for n in (1, 2, 3)]
    assert first == again  # the same line of the same file samples the same
    assert len({first[0][0][0], *later}) > 1  # another chunk's batch 0 gets another key


def test_a_checkpoint_loads_on_another_number_of_devices(tiny_workdir, tiny_loaded):
    from model import make_mesh
    from workdirs.restore import load

    model, params, tokenizer = tiny_loaded  # trained and loaded on all 8 simulated devices
    greedy = SearchConfig(method="greedy")
    expected = Translator(model, tokenizer, greedy).translate(params, LINES[:3])
    one, two = jax.devices()[:1], jax.devices()[:2]
    for mesh in (make_mesh(devices=one), make_mesh(fsdp=2, devices=two)):
        _, moved, _ = load(tiny_workdir, mesh=mesh)
        leaf = jax.tree.leaves(moved)[0]
        assert len(leaf.sharding.device_set) <= mesh.size
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        got = Translator(model, tokenizer, greedy, mesh=mesh).translate(moved, LINES[:3])
        assert [g[0][0] for g in got] == [e[0][0] for e in expected]


@pytest.mark.parametrize("amx", [False, True])
def test_a_bf16_model_decodes_in_bf16_on_cpu_only_with_amx(tiny_loaded, monkeypatch, amx):
    from runtime import hardware

    flags = {"avx512f", "avx512_bf16"} | ({"amx_bf16", "amx_tile"} if amx else set())
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("a test CPU", frozenset(flags)))
    model, params, tokenizer = tiny_loaded
    bf16 = type(model)(dataclasses.replace(model.config, dtype="bfloat16"))
    auto = Translator(bf16, tokenizer, SearchConfig(method="greedy"))
    asked = {
        d: Translator(bf16, tokenizer, SearchConfig(method="greedy"), dtype=d)
        for d in ("float32", "bfloat16")
    }
    want = "bfloat16" if amx else "float32"
    assert auto.model.config.dtype == want
    assert {d: t.model.config.dtype for d, t in asked.items()} == {d: d for d in asked}
    assert auto.translate(params, LINES) == asked[want].translate(params, LINES)
    f32 = Translator(model, tokenizer, SearchConfig(method="greedy"))  # trained in float32
    assert f32.model.config.dtype == "float32"


def test_search_config_refuses_an_unknown_stopping_rule():
    with pytest.raises(ValueError, match="stopping must be one of exact, count, got 'never'"):
        SearchConfig(stopping="never")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(alpha=float("nan")), r"--alpha=nan: .* finite number within \[0, 10\]"),
        (dict(alpha=1e9), r"--alpha=1e\+09: .* within \[0, 10\]"),
        (dict(alpha=-0.5), r"--alpha=-0.5: .* within \[0, 10\]"),
        (dict(beam_size=0), r"--beam_size=0: must be at least 1"),
        (dict(beam_size=2, n_best=3), r"--n_best=3: must be within \[1, --beam_size=2\]"),
        (dict(n_best=0), r"--n_best=0: must be within \[1, --beam_size=4\]"),
        (dict(method="greedy", n_best=2), r"--n_best=2 needs --method=beam"),
        (dict(extra_len=0), r"--max_new_tokens=0: must be at least 1"),
        (dict(method="sample", temperature=0.0), r"--temperature=0: must be a finite number > 0"),
        (dict(temperature=float("inf")), r"--temperature=inf: must be a finite number > 0"),
        (dict(top_k=-1), r"--top_k=-1: must be at least 0"),
        (dict(top_p=0.0), r"--top_p=0: must be within \(0, 1\]"),
        (dict(top_p=1.5), r"--top_p=1.5: must be within \(0, 1\]"),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else "",
)
def test_search_config_refuses_values_outside_their_range(bad, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**bad)


def test_search_config_takes_the_edges_of_each_range():
    SearchConfig(alpha=0.0)
    SearchConfig(alpha=10.0, beam_size=1, n_best=1, extra_len=1)
    SearchConfig(method="sample", temperature=1e-3, top_k=0, top_p=1.0)


def test_the_position_table_warning_is_logged_once_then_totalled(tiny_loaded, caplog):
    model, params, tokenizer = tiny_loaded
    # The position table cuts the output limit of every source (EOS included, itself cut to
    # max_positions - 1) for which source + 50 does not fit: with 64 positions, over 14 tokens.
    positions = model.config.max_positions
    long_lines = [
        f"The {n} sons of Israel went out of Egypt with {n + 1} sheep." for n in range(40)
    ]
    lines = long_lines + ["Amen."] * 10
    n = [min(len(tokenizer.encode(line)) + 1, positions - 1) for line in lines]
    expected = sum(k + 50 > positions for k in n)
    assert expected >= 40
    greedy = Translator(model, tokenizer, SearchConfig(method="greedy"), tokens_per_batch=128)
    assert len(greedy.batches(lines)) > 4  # several batches, each with long sources
    with caplog.at_level("WARNING", logger="decoding.translate"):
        greedy.translate(params, lines[:25])
        greedy.translate(params, lines[25:])
        said = [r.getMessage() for r in caplog.records if "may produce fewer" in r.getMessage()]
        assert len(said) == 1 and "for the first batch only" in said[0]
        greedy.log_cut_sentences()
    said = [r.getMessage() for r in caplog.records if "may produce fewer" in r.getMessage()]
    assert greedy.cut_sentences == expected
    assert len(said) == 2 and said[1].startswith(f"in all, {expected} sentences")
