"""OPUS-MT (Hugging Face Marian) import and export: a random MarianMTModel built here scores,
translates and round-trips like transformers; fine-tuning an import trains; bad input is one
error line, a non-zero exit and nothing written."""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data.marian_tokenizer import MarianTokenizer, project_to_marian  # noqa: E402
from decoding.translate import SearchConfig, Translator  # noqa: E402
from interop import marian, marian_export  # noqa: E402
from interop.workdir_format import read_workdir  # noqa: E402
from model import Transformer  # noqa: E402
from tests import marian_fixture  # noqa: E402
from tests import test_convert_ctranslate2 as convert_ct2_tests  # noqa: E402
from tests.test_convert_ctranslate2 import error_lines, run_convert  # noqa: E402

SOURCES = [
    "In the beginning God created the heavens and the earth.",
    "Jesus wept.",
    "God is love and light",
    ">>spa<< And God said, Let there be light: and there was light.",
]
TARGETS = [
    "En el principio creó Dios los cielos y la tierra.",
    "Jesús lloró.",
    "Dios es amor",
    "Y dijo Dios: Sea la luz: y fué la luz.",
]


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    return marian_fixture.build(tmp_path_factory.mktemp("marian") / "opus-mt-en-es")


def hf_model(directory):
    model = transformers.MarianMTModel.from_pretrained(directory).eval()
    return model, transformers.MarianTokenizer.from_pretrained(directory)


def project_log_probs(model, params, tokenizer, sources, targets):
    return convert_ct2_tests.project_log_probs(
        model, params, tokenizer, list(zip(sources, targets, strict=True))
    )


def assert_close(ours, theirs, atol=1e-4):
    assert len({len(x) for x in ours}) > 2  # targets of several lengths: padding in the batch
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


def test_the_tokenizer_gives_transformers_ids(marian_dir):
    ours = MarianTokenizer.from_files(marian_dir)
    _, hf_tok = hf_model(marian_dir)
    batch = hf_tok(SOURCES, text_target=TARGETS)
    pad = ours.marian_pad
    for text, ids in zip(SOURCES, batch["input_ids"], strict=True):
        assert list(project_to_marian(ours.encode(text) + [ours.eos_id], pad)) == ids
    for text, ids in zip(TARGETS, batch["labels"], strict=True):
        assert list(project_to_marian(ours.encode(text, side="target") + [1], pad)) == ids
        assert ours.decode(ours.encode(text, side="target")) == hf_tok.decode(
            ids, skip_special_tokens=True
        )
    assert ours.encode(SOURCES[3])[0] == 3  # ">>spa<<", Marian id 2, is one token
    assert (ours.pad_id, ours.eos_id, ours.bos_id) == (0, 1, 0)


@pytest.mark.parametrize("activation", ["swish", "gelu", "relu"])
def test_an_import_scores_what_transformers_scores(marian_dir, tmp_path, activation):
    directory = marian_dir
    if activation != "swish":
        directory = marian_fixture.build(tmp_path / activation, activation=activation, seed=1)
    bundle = marian.read(directory)
    assert bundle.config.activation == activation
    model = Transformer(bundle.config)
    ours = project_log_probs(model, bundle.params, bundle.tokenizer, SOURCES, TARGETS)
    theirs = marian_fixture.hf_logprobs(*hf_model(directory), SOURCES, TARGETS)
    worst = assert_close(ours, theirs)
    print(f"{activation}: max |log-prob difference| {worst:.2e}")


def test_greedy_translations_equal_generate(marian_dir):
    bundle = marian.read(marian_dir)
    model, tok = Transformer(bundle.config), bundle.tokenizer
    ours = Translator(model, tok, SearchConfig(method="greedy")).translate(bundle.params, SOURCES)
    hf, hf_tok = hf_model(marian_dir)
    batch = hf_tok(SOURCES, return_tensors="pt", padding=True)
    # Our limit: the source length + 50, within the position table; the same for generate.
    generated = hf.generate(**batch, num_beams=1, do_sample=False, max_length=64)
    texts = hf_tok.batch_decode(generated, skip_special_tokens=True)
    ended = 0
    for nbest, text, row in zip(ours, texts, generated.tolist(), strict=True):
        if 0 in row[1:40]:  # the model's own EOS, well before either limit
            assert nbest[0][0] == text
            ended += 1
        else:  # cut at a limit: the words so far agree
            assert text.startswith(nbest[0][0]) or nbest[0][0].startswith(text)
    assert ended >= 3


@pytest.fixture(scope="module")
def imported(marian_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "workdir"
    result = run_convert(f"--input=marian:{marian_dir}", f"--output=workdir:{out}")
    assert result.returncode == 0, result.stderr
    return out


def test_round_trip_workdir_marian_workdir_keeps_every_parameter(marian_dir, imported, tmp_path):
    assert {"model_config.json", "marian_tokenizer.json", "source.spm", "imported"} <= {
        p.name for p in imported.iterdir()
    }
    exported = tmp_path / "exported"
    result = run_convert(f"--input=workdir:{imported}", f"--output=marian:{exported}")
    assert result.returncode == 0, result.stderr
    again = tmp_path / "again"
    assert run_convert(f"--input=marian:{exported}", f"--output=workdir:{again}").returncode == 0
    first, second = read_workdir(imported), read_workdir(again)
    assert first.config == second.config
    jax.tree.map(np.testing.assert_array_equal, first.params, second.params)
    # transformers loads the export and scores as the original does.
    loaded, info = transformers.MarianMTModel.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = marian_fixture.hf_logprobs(*hf_model(marian_dir), SOURCES, TARGETS)
    back = marian_fixture.hf_logprobs(loaded.eval(), hf_model(exported)[1], SOURCES, TARGETS)
    assert_close(back, original, atol=1e-6)
    ours = project_log_probs(Transformer(first.config), first.params, first.tokenizer,
                             SOURCES, TARGETS)  # fmt: skip
    assert_close(ours, original)


def test_a_model_trained_here_exports_to_transformers(tiny_workdir, tiny_loaded, tmp_path):
    model, params, tokenizer = tiny_loaded
    out = tmp_path / "hf"
    result = run_convert(f"--input=workdir:{tiny_workdir}", f"--output=marian:{out}")
    assert result.returncode == 0, result.stderr
    assert "LayerNorm epsilon" in result.stderr  # trained with 1e-6; transformers uses 1e-5
    hf, hf_tok = hf_model(out)
    pairs = [("Jesus wept.", "Jesús lloró."), ("God is love.", "Dios es amor."),
             ("In the beginning God created the heavens and the earth.",
              "En el principio creó Dios los cielos y la tierra.")]  # fmt: skip
    sources, targets = zip(*pairs, strict=True)
    batch = hf_tok(list(sources), text_target=list(targets))
    for text, ids in zip(sources, batch["input_ids"], strict=True):
        assert tokenizer.encode(text) + [tokenizer.eos_id] == ids  # the same ids, unpermuted
    ours = project_log_probs(model, params, tokenizer, sources, targets)
    theirs = marian_fixture.hf_logprobs(hf, hf_tok, list(sources), list(targets))
    worst = assert_close(ours, theirs, atol=1e-3)
    print(f"max |log-prob difference| {worst:.2e} (LayerNorm epsilon 1e-6 here, 1e-5 there)")
    again = tmp_path / "again"
    assert run_convert(f"--input=marian:{out}", f"--output=workdir:{again}").returncode == 0
    back, original = read_workdir(again), read_workdir(tiny_workdir)
    assert back.config == original.config  # epsilon 1e-6, no biases: kept through the export
    jax.tree.map(np.testing.assert_array_equal, original.params, back.params)


def test_decode_py_translates_with_an_import(marian_dir, imported, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "in.txt").write_text("\n".join([SOURCES[2], "", *SOURCES]) + "\n")
    result = subprocess.run(
        [sys.executable, "decode.py", f"--workdir={imported}", f"--input={tmp_path / 'in.txt'}",
         f"--output={tmp_path / 'out.txt'}", "--method=greedy",
         f"--attention_plot={tmp_path / 'attention.png'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out.txt").read_text().split("\n")
    bundle = marian.read(marian_dir)  # greedy here equals transformers' generate (above)
    translator = Translator(Transformer(bundle.config), bundle.tokenizer, SearchConfig("greedy"))
    expected = [nbest[0][0] for nbest in translator.translate(bundle.params, SOURCES)]
    assert lines == [expected[2], "", *expected, ""] and lines[0]
    assert (tmp_path / "attention-decoder.png").read_bytes()[:4] == b"\x89PNG"  # plots.py


def test_fine_tuning_an_import_lowers_the_training_loss(imported, tmp_path):
    import training.loop
    from configs import opus_mt_finetune
    from configs.tiny import CORPUS
    from tests.test_train import QUIET, losses

    cfg = opus_mt_finetune.get_config()  # on the fixture corpus, shorter and faster
    cfg.update(dict(num_train_steps=12, warmup_steps=4, cooldown_steps=0, lr_scale=0.3,
                    tokens_per_step=1024, row_length=64, init_from=str(imported),
                    checkpoint_every_steps=12, **QUIET))  # fmt: skip
    # The final evaluation (dev loss, greedy BLEU) with the imported tokenizer.
    cfg.update(dict(eval_at_end=True, eval_every_steps=12, eval_sentences=8, beam_size=1))
    cfg.data.update(dict(source="text", train_prefix=str(CORPUS / "train"),
                         dev_prefix=str(CORPUS / "dev")))  # fmt: skip
    cfg.model.overrides.dropout_rate = 0.0
    tuned = tmp_path / "tuned"
    training.loop.train_and_evaluate(cfg, tuned)
    assert json.loads((tuned / "model_config.json").read_text())["activation"] == "swish"
    assert (tuned / "vocab.json").read_bytes() == (imported / "vocab.json").read_bytes()
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert any("bleu" in r for r in rows) and any("dev_loss" in r for r in rows)
    loss = losses(tuned)
    first, last = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in (10, 11, 12)])
    assert last < first - 0.3, loss


def _copy(marian_dir, tmp_path):
    return shutil.copytree(marian_dir, tmp_path / "broken")


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
         "pytorch_model.bin, which is a pickle and is never loaded"),
        (lambda d: (d / "vocab.json").unlink(), "vocab.json: missing"),
        (lambda d: (d / "source.spm").unlink(), "source.spm: missing"),
        (lambda d: _edit_config(d, vocab_size=999, decoder_vocab_size=999),
         "vocab_size=999: they do not belong"),
        (lambda d: _edit_config(d, share_encoder_decoder_embeddings=False),
         "share_encoder_decoder_embeddings=False is not supported"),
        (lambda d: _edit_config(d, normalize_before=True), "normalize_before=True"),
        (lambda d: _edit_config(d, static_position_embeddings=False),
         "static_position_embeddings=False is not supported"),
        (lambda d: _edit_config(d, activation_function="tanh"), "activation_function='tanh'"),
        (lambda d: _edit_config(d, d_model=48), "has shape"),
    ],
)  # fmt: skip
def test_bad_marian_input_is_one_error_line_and_nothing_written(
    marian_dir, tmp_path, damage, message
):
    broken = _copy(marian_dir, tmp_path)
    damage(broken)
    out = tmp_path / "out"
    result = run_convert(f"--input=marian:{broken}", f"--output=workdir:{out}")
    assert result.returncode == 1
    errors = error_lines(result)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_what_marian_cannot_express_is_refused(tiny_loaded, tmp_path):
    from interop import ConversionError, TransformerBundle
    from tests.test_convert_ctranslate2 import random_params

    _, _, tokenizer = tiny_loaded
    for change, message in ((dict(norm="pre"), "norm='pre'"),
                            (dict(positional_encoding="concat"), "'concat'")):  # fmt: skip
        cfg = tiny_loaded[0].config.replace(**change)
        bundle = TransformerBundle.from_params(cfg, random_params(Transformer(cfg)), tokenizer)
        with pytest.raises(ConversionError, match=message):
            marian_export.write(bundle, tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_an_import_exports_to_ctranslate2(imported, tmp_path):
    import ctranslate2

    from interop import ctranslate2_run

    out = tmp_path / "ct2"
    result = run_convert(f"--input=workdir:{imported}", f"--output=ctranslate2:{out}")
    assert result.returncode == 0, result.stderr
    assert {"source.spm", "target.spm", "shared_vocabulary.json"} <= {p.name for p in out.iterdir()}
    bundle = read_workdir(imported)
    tok, model = bundle.tokenizer, Transformer(bundle.config)
    translator = ctranslate2.Translator(str(out), intra_threads=2)

    def pieces(ids):
        return [tok.id_to_piece(i) for i in ids]

    scored = translator.score_batch(
        [pieces(tok.encode(s) + [tok.eos_id]) for s in SOURCES],
        [pieces(tok.encode(t, side="target")) for t in TARGETS],
    )
    theirs = [np.asarray(r.log_probs) for r in scored]
    ours = project_log_probs(model, bundle.params, tok, SOURCES, TARGETS)
    worst = assert_close(ours, theirs)
    print(f"CTranslate2: max |log-prob difference| {worst:.2e}")
    greedy = Translator(model, tok, SearchConfig(method="greedy"))
    expected = [nbest[0][0] for nbest in greedy.translate(bundle.params, SOURCES)]
    got = ctranslate2_run.translate(translator, tok, SOURCES,
                                    max_positions=bundle.config.max_positions,
                                    beam_size=1, batch_tokens=1)  # fmt: skip
    assert got == expected
