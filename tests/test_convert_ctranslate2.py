"""convert.py --output=ctranslate2: the export scores and translates like the project; bad input
is one error line, a non-zero exit and nothing written."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

ctranslate2 = pytest.importorskip("ctranslate2")

from data.tokenizer import EOS_ID  # noqa: E402
from decoding.translate import SearchConfig, Translator  # noqa: E402
from interop import ConversionError, TransformerBundle, ctranslate2_run, registry  # noqa: E402
from interop import ctranslate2 as ct2_export  # noqa: E402
from interop.workdir_format import read_workdir  # noqa: E402
from model import Transformer, TransformerConfig, shift_right  # noqa: E402
from tests.conftest import REPO  # noqa: E402

THREADS = 2
PAIRS = [
    ("Jesus wept.", "Jesús lloró."),
    ("God is love.", "Dios es amor."),
    ("In the beginning God created the heavens and the earth.",
     "En el principio creó Dios los cielos y la tierra."),
    ("And the earth was without form, and void; and darkness was upon the face of the deep. "
     "And the Spirit of God moved upon the face of the waters.",
     "Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la faz del abismo, "
     "y el Espíritu de Dios se movía sobre la faz de las aguas."),
    ("Light", "Luz"),
    ("The sons of Israel went out of Egypt with all their flocks.",
     "Los hijos de Israel salieron de Egipto con todos sus rebaños."),
]  # fmt: skip


def run_convert(*args: str) -> subprocess.CompletedProcess:
    """convert.py on one CPU device (the tiny workdir was saved from the tests' eight)."""
    return subprocess.run(
        [sys.executable, "convert.py", *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "XLA_FLAGS": ""},
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def exported(tiny_workdir, tmp_path_factory):
    """The tiny workdir exported in float32 through the command line."""
    out = tmp_path_factory.mktemp("ct2") / "model"
    result = run_convert(
        f"--input=workdir:{tiny_workdir}", f"--output=ctranslate2:{out}", "--checkpoint=latest"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.bin", "config.json", "shared_vocabulary.json", "tokenizer.model"} <= {
        p.name for p in out.iterdir()
    }
    return out


def project_log_probs(model, params, tokenizer, pairs):
    """Teacher-forced log P(target token) of every target token, EOS included, one batch
    (the target side encoded as targets: Marian tokenizers have a model per side)."""
    srcs = [tokenizer.encode(s) + [tokenizer.eos_id] for s, _ in pairs]
    tgts = [tokenizer.encode(t, side="target") + [tokenizer.eos_id] for _, t in pairs]

    def pad(rows):
        out = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return jnp.asarray(out)

    tgt = pad(tgts)
    decoder_input = shift_right(tgt, tokenizer.bos_id)
    logits = jax.jit(model.apply)({"params": params}, pad(srcs), decoder_input)
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return [lp[i, np.arange(len(t)), t] for i, t in enumerate(tgts)]


def ct2_log_probs(translator, tokenizer, pairs):
    def pieces(text, eos):
        return [tokenizer.id_to_piece(i) for i in tokenizer.encode(text) + [EOS_ID] * eos]

    results = translator.score_batch(
        [pieces(s, True) for s, _ in pairs], [pieces(t, False) for _, t in pairs]
    )
    return [np.asarray(r.log_probs) for r in results]


def assert_same_log_probs(model, params, tokenizer, model_dir):
    translator = ctranslate2.Translator(str(model_dir), intra_threads=THREADS)
    ours = project_log_probs(model, params, tokenizer, PAIRS)
    theirs = ct2_log_probs(translator, tokenizer, PAIRS)
    assert len({len(x) for x in ours}) > 3  # several target lengths, padded in both batches
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def assert_same_greedy(model, params, tokenizer, model_dir, lines):
    project = Translator(model, tokenizer, SearchConfig(method="greedy"))
    ours = [nbest[0][0] for nbest in project.translate(params, lines)]
    translator = ctranslate2.Translator(str(model_dir), intra_threads=THREADS)
    theirs = ctranslate2_run.translate(
        translator,
        tokenizer,
        lines,
        max_positions=model.config.max_positions,
        beam_size=1,
        batch_tokens=1,
    )
    assert theirs == ours


def test_float32_export_gives_the_projects_log_probs(tiny_loaded, exported):
    model, params, tokenizer = tiny_loaded
    worst = assert_same_log_probs(model, params, tokenizer, exported)
    print(f"max |log-prob difference| {worst:.2e}")


def test_greedy_translations_are_the_projects(tiny_loaded, exported):
    model, params, tokenizer = tiny_loaded
    # Two padded widths (8 and the longest source) keep compilations few; empty and blank lines
    # give empty outputs, the long line is truncated to max_positions - 1 tokens by both.
    lines = ["Jesus wept.", "God is love.", "Light", "", "   ", " ".join(["And God said"] * 30)]
    assert_same_greedy(model, params, tokenizer, exported, lines)


@pytest.mark.parametrize("quantization, size, compute", [("int8", 0.6, "int8"),
                                                         ("bfloat16", 0.6, "")])  # fmt: skip
def test_quantized_export_loads_and_translates(
    tiny_workdir, exported, tmp_path, quantization, size, compute
):
    bundle = read_workdir(tiny_workdir)
    out = ct2_export.export(bundle, tmp_path / quantization, quantization=quantization)
    assert (out / "model.bin").stat().st_size < size * (exported / "model.bin").stat().st_size
    translator = ctranslate2.Translator(str(out), intra_threads=THREADS)
    assert translator.compute_type.startswith(compute)  # bfloat16 runs as float32 on most CPUs
    outputs = ctranslate2_run.translate(
        translator,
        bundle.tokenizer,
        ["God is love.", "Jesus wept."],
        max_positions=bundle.config.max_positions,
    )
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def random_params(model: Transformer, seed: int = 0) -> dict:
    """Random parameters of the model's shapes (drawn in NumPy: no initialiser to compile)."""
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
        return 1.0 + noise / 3 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_pre_ln_concat_positions_and_another_epsilon_match(tiny_loaded, tmp_path):
    _, _, tokenizer = tiny_loaded
    cfg = TransformerConfig.tiny(
        tokenizer.vocab_size, norm="pre", positional_encoding="concat", layer_norm_epsilon=1e-5,
        num_decoder_layers=3, max_positions=64,
    )  # fmt: skip
    model = Transformer(cfg)
    bundle = TransformerBundle.from_params(cfg, random_params(model), tokenizer)
    assert "encoder_norm" in bundle.params and "decoder_norm" in bundle.params
    out = ct2_export.export(bundle, tmp_path / "pre")
    assert_same_log_probs(model, bundle.params, tokenizer, out)
    assert_same_greedy(model, bundle.params, tokenizer, out, ["Jesus wept.", "God is love."])


def test_force_replaces_and_a_failed_export_writes_nothing(tiny_workdir, tmp_path):
    bundle = read_workdir(tiny_workdir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        ct2_export.export(bundle, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    ct2_export.export(bundle, out, force=True)
    assert not (out / "old.txt").exists() and (out / "model.bin").exists()
    extra = {**bundle.params, "unknown_layer": {"w": np.zeros((2, 2), np.float32)}}
    broken = TransformerBundle(bundle.config, extra, bundle.tokenizer)
    with pytest.raises(ConversionError, match="no CTranslate2 counterpart: unknown_layer/w"):
        ct2_export.export(broken, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory


def test_options_the_kinds_do_not_take_are_refused_before_reading(monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("should not be called")

    fake = registry.Writer(help="test", options=(), check=never, write=never)
    monkeypatch.setitem(registry.WRITERS, "fake", fake)
    with pytest.raises(ConversionError, match="--quantization does not apply to .*fake:"):
        registry.convert("workdir:/nonexistent", f"fake:{tmp_path}/x", quantization="int8")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input=foo:{wd}", "--output=ctranslate2:{out}"], "KIND one of workdir:"),
        (["--input={wd}", "--output=ctranslate2:{out}"], "expected KIND:PATH"),
        (["--input=workdir:{wd}", "--output=onnx:{out}"], "KIND one of ctranslate2:"),
        (["--input=workdir:{wd}", "--output=ctranslate2:{out}", "--quantization=int4"],
         "not a CTranslate2 quantization; known: int8"),
        (["--input=workdir:{wd}", "--output=ctranslate2:{existing}"],
         "already exists; pass --force"),
        (["--input=workdir:{existing}", "--output=ctranslate2:{existing}", "--force"],
         "would replace the input"),
        (["--input=workdir:{existing}", "--output=ctranslate2:{tmp}", "--force"],
         "would replace the input"),
        (["--input=workdir:{wd}", "--output=ctranslate2:{out}", "--checkpoint=999"],
         "no checkpoint for step 999"),
        (["--input=workdir:{no_tokenizer}", "--output=ctranslate2:{out}"], "missing tokenizer"),
        (["--input=workdir:{no_checkpoint}", "--output=ctranslate2:{out}"],
         "no checkpoints checkpoint in"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_nothing_written(tiny_workdir, tmp_path, args, message):
    no_tokenizer, no_checkpoint = tmp_path / "no_tokenizer", tmp_path / "no_checkpoint"
    if "{no_tokenizer}" in " ".join(args):
        shutil.copytree(tiny_workdir, no_tokenizer)
        (no_tokenizer / "tokenizer.model").unlink()
    if "{no_checkpoint}" in " ".join(args):
        shutil.copytree(tiny_workdir, no_checkpoint, ignore=shutil.ignore_patterns("checkpoints"))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("mine")
    out = tmp_path / "out"
    paths = dict(
        wd=tiny_workdir, out=out, existing=existing, no_tokenizer=no_tokenizer,
        no_checkpoint=no_checkpoint, tmp=tmp_path,
    )  # fmt: skip
    result = run_convert(*[a.format(**paths) for a in args])
    assert result.returncode == 1
    errors = error_lines(result)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists()
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
