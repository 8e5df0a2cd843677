"""The default corpus: English -> Spanish Bible verses, built locally from Debian packages.

Both texts are public domain and packaged by Debian as SWORD modules: the World English Bible
(`sword-text-web`, module engWEB2015eb) and the Reina-Valera 1909 (`sword-text-sparv`, module
spaRV1909eb). `ensure_default_corpus` builds the corpus once and caches it; the steps are:

1. Install the modules and `mod2imp` (`libsword-utils`) with apt if they are missing (root or
   password-less sudo only; otherwise `CorpusBuildError` says what to do instead).
2. Dump each module with `mod2imp` and clean every verse's OSIS markup (`data.osis`): notes,
   cross-references, headings and Strong's/morphology tags go, canonical psalm titles stay,
   entities and white space are normalised; empty verses are dropped.
3. Pair the verses chapter by chapter. Most verses pair by number, but the RV1909 numbers
   verses differently in 10 chapters (Num 13, 30, 1 Sam 24, 1 Kgs 22, 1 Chr 21, 2 Chr 33,
   Job 39-40, Hos 12, Jonah 2) and merges or splits a few others. A small dynamic programme
   (Gale & Church 1993 style) aligns each chapter with 1-1, 1-0, 0-1, 2-1 and 1-2 beads; a 1-1
   bead costs a character-length term plus a lexical term (the idf-weighted share of the English
   verse's words whose translation, from a Dice lexicon learnt on same-numbered pairs, is in
   the Spanish verse). Only 1-1 beads are kept; a renumbered pair only inside a run of at least
   3 pairs with one offset, and pairs with an extreme length ratio or almost no lexical overlap
   are dropped, so no misaligned pair gets in. The lexicon and length model always come from
   the whole Bible, so a build of a few books gives the same pairs as the full build.
4. Split by whole book: the `DEV_BOOKS` are dev, the `TEST_BOOKS` test, all others train.
5. Write `{train,dev,test}.{en,es}` (one verse per line), `{split}.ref` (the English and Spanish
   verse references of each pair) and, last, `manifest.json` with the counts.

The result is the same as the reference build `build_corpus.sh` (web-rv1909): 28,543 train,
902 dev and 1,504 test pairs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import sparse

from data import osis
from data.osis import ENV_VAR, SOURCE_MODULE, TARGET_MODULE, CorpusBuildError

__all__ = ["CorpusBuildError", "Pair", "align", "build_corpus", "ensure_default_corpus", "split_of"]

log = logging.getLogger(__name__)

DEV_BOOKS = ("Eccl", "Lam", "Joel", "Hab", "Gal", "Phil", "1John", "Titus")
TEST_BOOKS = ("Ruth", "Esth", "Jonah", "Acts", "Jas", "1Pet")
SPLITS = ("train", "dev", "test")
CORPUS_NAME = "bible-en-es"
MANIFEST = "manifest.json"
FORMAT = 1  # bump when the output changes, so that cached copies are rebuilt

# Aligner constants (costs in units of a squared Gale-Church length delta / 2).
_DELTA_CAP = 4.0  # length delta cap inside the DP
_W_LEX, _SIM_OK, _LEX_NEUTRAL = 6.0, 0.5, 1.5  # lexical cost W*max(0, 1-sim/OK); no evidence
_P_RENUM = 0.5  # a 1-1 bead between different verse numbers
_CAP_SAME = 6.0  # a 1-1 bead between equal verse numbers never costs more
_C_SKIP, _C_MERGE = 4.0, 4.0  # 1-0 / 0-1 beads; 2-1 / 1-2 beads (plus their 1-1 cost)
_DELTA_MAX, _SIM_MIN, _RUN_MIN = 6.0, 0.1, 3  # filters on kept pairs (see the docstring)

Ref = tuple[str, int, int]  # (OSIS book, chapter, verse)


class Pair(NamedTuple):
    """One aligned verse pair; the Spanish verse number differs in renumbered chapters."""

    book: str
    chapter: int
    en_verse: int
    es_verse: int
    en: str
    es: str


def split_of(book: str) -> str:
    """Returns 'dev', 'test' or 'train': the split an OSIS book id belongs to."""
    return "dev" if book in DEV_BOOKS else "test" if book in TEST_BOOKS else "train"


def default_data_dir() -> Path:
    """`$XDG_CACHE_HOME/aiayn-jax` (default `~/.cache/aiayn-jax`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aiayn-jax"


def ensure_default_corpus(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns the default corpus directory, building it the first time.

    `$AIAYN_DEFAULT_CORPUS`, where set to a directory with `train.{en,es}` and `dev.{en,es}`, is
    used as is. Otherwise the corpus lives in `data_dir/bible-en-es`; it is built in a temporary
    directory renamed at the end, so an interrupted build never looks complete.

    Args:
        data_dir: Where to keep the corpus; `default_data_dir()` if None.

    Returns:
        The directory holding `{train,dev,test}.{en,es}`.

    Raises:
        CorpusBuildError: The SWORD tools are missing and cannot be installed.
    """
    if prebuilt := os.environ.get(ENV_VAR):
        path = Path(prebuilt).expanduser()
        missing = [f"{s}.{lang}" for s in SPLITS[:2] for lang in ("en", "es")]
        missing = [name for name in missing if not (path / name).is_file()]
        if not missing:
            return path
        log.warning("%s=%s lacks %s; building the corpus instead", ENV_VAR, path, missing)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    final = root / CORPUS_NAME
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CORPUS_NAME}.", dir=root))
    try:
        log.info("building the default corpus in %s (once; about a minute)", final)
        build_corpus(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the corpus from other users
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # an interrupted copy from before temp dirs, or an old format
        try:
            tmp.rename(final)
        except OSError:
            if not is_complete(final):  # else another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    """Whether `path` holds a finished full build of the current format."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = [path / f"{s}.{lang}" for s in SPLITS for lang in ("en", "es")]
    full = manifest.get("books") == list(osis.BOOK_IDS)
    return manifest.get("format") == FORMAT and full and all(f.is_file() for f in files)


def build_corpus(out_dir: str | os.PathLike, books: Iterable[str] | None = None) -> dict:
    """Builds the corpus (or the part of it from `books`) into `out_dir`.

    Args:
        out_dir: Output directory (created; files in it are overwritten).
        books: OSIS ids (`osis.BOOK_IDS`) of the books to build; all 66 if None.

    Returns:
        The manifest written to `out_dir/manifest.json`.

    Raises:
        CorpusBuildError: The SWORD tools are missing and cannot be installed, or fail.
        ValueError: An unknown book id.
    """
    start = time.monotonic()
    books = list(osis.BOOK_IDS if books is None else books)
    if unknown := sorted(set(books) - set(osis.BOOK_IDS)):
        raise ValueError(f"unknown OSIS book ids {unknown}; expected some of {osis.BOOK_IDS}")
    mod2imp = osis.ensure_sword()
    english, spanish = (osis.dump_module(mod2imp, m) for m in (SOURCE_MODULE, TARGET_MODULE))
    pairs, stats = align(english, spanish, books)
    versions = {m: osis.module_version(m) for m in (SOURCE_MODULE, TARGET_MODULE)}
    info = {"modules": versions, "alignment": stats}
    return write_corpus(out_dir, pairs, books, seconds=round(time.monotonic() - start, 1), **info)


def write_corpus(out_dir: str | os.PathLike, pairs: Sequence[Pair], books, **info) -> dict:
    """Writes the split files of `pairs`, then the manifest (the mark of a finished build).

    Args:
        out_dir: Output directory (created).
        pairs: The aligned verses, in order.
        books: The OSIS ids of the books built.
        **info: More entries for the manifest.

    Returns:
        The manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        rows = [p for p in pairs if split_of(p.book) == split]
        counts[split] = len(rows)
        (out / f"{split}.en").write_text("".join(p.en + "\n" for p in rows), encoding="utf-8")
        (out / f"{split}.es").write_text("".join(p.es + "\n" for p in rows), encoding="utf-8")
        refs = (
            f"{p.book}.{p.chapter}.{p.en_verse}\t{p.book}.{p.chapter}.{p.es_verse}\n" for p in rows
        )
        (out / f"{split}.ref").write_text("".join(refs), encoding="utf-8")
    manifest = {"format": FORMAT, "counts": counts, "books": list(books)}
    manifest |= {"dev_books": DEV_BOOKS, "test_books": TEST_BOOKS, **info}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --- alignment ---------------------------------------------------------------------------------


class _Model(NamedTuple):
    """What the aligner learns from all same-numbered verse pairs."""

    lexicon: sparse.csr_matrix  # [stem, stem] -> 1 if the second may translate the first
    idf: np.ndarray  # [stem] -> log(n / (1 + English verses with it)); 1 if never seen
    translatable: np.ndarray  # [stem] -> has a lexicon entry
    long: np.ndarray  # [stem] -> at least 4 letters (a shared name or number counts as evidence)
    ratio: float  # Spanish characters per English character
    var: float  # variance of Spanish length per English character


def _stemmer():
    # Lower-cased, accent-free 5-letter prefixes: crude, but language-neutral and good enough
    # to match inflected forms and names spelt alike in both texts ('Jerus', 'babil').
    vocab: dict[str, int] = {}
    memo: dict[str, int] = {}

    def ids(text: str) -> np.ndarray:
        out = set()
        for word in re.findall(r"\w+", text):
            if (i := memo.get(word)) is None:
                bare = unicodedata.normalize("NFD", word.lower())
                stem = "".join(c for c in bare if not unicodedata.combining(c))[:5]
                i = memo[word] = vocab.setdefault(stem, len(vocab))
            out.add(i)
        return np.array(sorted(out), dtype=np.int64)

    return ids, vocab


def _incidence(rows: Sequence[np.ndarray], width: int) -> sparse.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), width))


def _fit(en: dict, es: dict, en_ids: dict, es_ids: dict, vocab: dict) -> _Model:
    keys = [k for k in en if k in es]
    n, width = len(keys), len(vocab)
    a = _incidence([en_ids[k] for k in keys], width)
    b = _incidence([es_ids[k] for k in keys], width)
    df_a, df_b = np.asarray(a.sum(0)).ravel(), np.asarray(b.sum(0)).ravel()
    co = (a.T @ b).tocoo()
    e, f, c = co.row, co.col, co.data
    # Dice lexicon: frequent enough to trust, rare enough to be informative.
    keep = (c >= 3) & (df_a[e] < 0.2 * n) & (df_b[f] < 0.2 * n)
    keep &= 2 * c / (df_a[e] + df_b[f]) >= 0.25
    lexicon = sparse.csr_matrix((np.ones(keep.sum()), (e[keep], f[keep])), shape=(width, width))
    idf = np.array([math.log(n / (1 + d)) if d else 1.0 for d in df_a.tolist()])
    long = np.zeros(width, bool)
    long[[i for s, i in vocab.items() if len(s) >= 4]] = True
    len_a = np.array([len(en[k]) for k in keys], float)
    len_b = np.array([len(es[k]) for k in keys], float)
    ratio = len_b.sum() / len_a.sum()
    # Gale & Church: median of the squared residuals / 0.455 estimates the variance robustly.
    var = float(np.median((len_b - ratio * len_a) ** 2 / len_a)) / 0.455
    return _Model(lexicon, idf, np.diff(lexicon.indptr) > 0, long, ratio, var)


def _delta(model: _Model, len_a, len_b) -> np.ndarray:
    """Gale & Church (1993) length delta, `len_a` as a column against `len_b` as a row."""
    len_a, len_b = np.asarray(len_a, float)[:, None], np.asarray(len_b, float)[None, :]
    return (len_b - model.ratio * len_a) / np.sqrt(model.var * np.maximum(len_a, 1))


def _overlap(model: _Model, src: list[np.ndarray], tgt: list[np.ndarray], width: int):
    """Lexical similarity of each src (row) with each tgt (column) stem set.

    A source stem counts if it has a lexicon entry (or is a long stem found in the target);
    similarity is the idf-weighted share of the counted stems found in the target or with a
    translation there. Returns (similarity, NaN where nothing counts; number of counted stems).
    """
    stems = np.unique(np.concatenate(src))
    x = _incidence([np.searchsorted(stems, ids) for ids in src], len(stems))
    t = _incidence(tgt, width)
    present = t[:, stems].toarray().T > 0  # [stem, target]
    translated = (model.lexicon[stems] @ t.T).toarray() > 0
    counted = model.translatable[stems, None] | (model.long[stems, None] & present)
    hit = (counted & present) | translated
    weight = x @ sparse.diags(model.idf[stems])
    total, hits, number = weight @ counted.astype(float), weight @ hit.astype(float), x @ counted
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(number > 0, hits / total, np.nan), number


def _bead_cost(model, len_a, len_b, src, tgt, width) -> tuple[np.ndarray, ...]:
    delta = _delta(model, len_a, len_b)
    sim, number = _overlap(model, src, tgt, width)
    capped = np.minimum(np.abs(delta), _DELTA_CAP)
    lexical = np.where(np.isnan(sim), _LEX_NEUTRAL, _W_LEX * np.maximum(0.0, 1.0 - sim / _SIM_OK))
    return capped * capped / 2 + lexical, delta, sim, number


def _best_beads(one, two_one, one_two, n: int, m: int) -> list[tuple[int, int, str]]:
    """The cheapest bead sequence aligning n with m verses, as (i, j, kind) in order.

    `one[i][j]`, `two_one[i][j]`, `one_two[i][j]`: the cost of the 1-1, 2-1 or 1-2 bead that
    starts at English verse i and Spanish verse j; skips cost `_C_SKIP`.
    """
    cost = [[math.inf] * (m + 1) for _ in range(n + 1)]  # of aligning a[:i] with b[:j]
    back: list[list] = [[None] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            # A fixed order of candidates (strict <) makes ties resolve the same way every time.
            best, arg = cost[i][j], None
            if i > 1 and j > 0:
                if (c := cost[i - 2][j - 1] + _C_MERGE + two_one[i - 2][j - 1]) < best:
                    best, arg = c, (2, 1)
            if i > 0 and j > 1:
                if (c := cost[i - 1][j - 2] + _C_MERGE + one_two[i - 1][j - 2]) < best:
                    best, arg = c, (1, 2)
            if i > 0 and j > 0 and (c := cost[i - 1][j - 1] + one[i - 1][j - 1]) < best:
                best, arg = c, (1, 1)
            if i > 0 and (c := cost[i - 1][j] + _C_SKIP) < best:
                best, arg = c, (1, 0)
            if j > 0 and (c := cost[i][j - 1] + _C_SKIP) < best:
                best, arg = c, (0, 1)
            if arg:
                cost[i][j], back[i][j] = best, arg
    beads, i, j = [], n, m
    while i or j:
        di, dj = back[i][j]
        i, j = i - di, j - dj
        beads.append((i, j, f"{di}{dj}"))
    return beads[::-1]


def _align_chapter(model: _Model, a: list, b: list, width: int, stats: dict) -> list[tuple]:
    """Aligns one chapter; a, b: [(verse, text, stem ids)]. Returns kept (i, j) index pairs."""
    n, m = len(a), len(b)
    la, lb = [len(v[1]) for v in a], [len(v[1]) for v in b]
    sa, sb = [v[2] for v in a], [v[2] for v in b]
    one, delta, sim, number = _bead_cost(model, la, lb, sa, sb, width)
    same = np.array([v[0] for v in a])[:, None] == np.array([v[0] for v in b])[None, :]
    one = np.where(same, np.minimum(one, _CAP_SAME), one + _P_RENUM).tolist()
    two_one = one_two = [[]]
    if n > 1:  # two English verses against one Spanish verse
        joined = [np.union1d(sa[i], sa[i + 1]) for i in range(n - 1)]
        two_one = _bead_cost(model, np.add(la[:-1], la[1:]) + 1, lb, joined, sb, width)[0].tolist()
    if m > 1:
        joined = [np.union1d(sb[j], sb[j + 1]) for j in range(m - 1)]
        one_two = _bead_cost(model, la, np.add(lb[:-1], lb[1:]) + 1, sa, joined, width)[0].tolist()
    pairs = []
    for i, j, bead in _best_beads(one, two_one, one_two, n, m):
        stats[f"bead_{bead}"] = stats.get(f"bead_{bead}", 0) + 1
        if bead == "11":
            pairs.append((i, j))
    # A renumbering is systematic: keep renumbered pairs only in runs with one offset.
    offset = [b[j][0] - a[i][0] for i, j in pairs]
    run_of = list(range(len(pairs)))  # index of the first pair of each pair's run
    for t in range(1, len(pairs)):
        (i, j), (pi, pj) = pairs[t], pairs[t - 1]
        if offset[t] == offset[t - 1] and (i, j) == (pi + 1, pj + 1):
            run_of[t] = run_of[t - 1]
    run_length = Counter(run_of)
    kept = []
    for t, (i, j) in enumerate(pairs):
        if offset[t] and run_length[run_of[t]] < _RUN_MIN:
            reason = "dropped_isolated_renumbered"
        elif abs(delta[i, j]) > _DELTA_MAX:
            reason = "dropped_length_outlier"
        elif number[i, j] >= 4 and sim[i, j] < _SIM_MIN:
            reason = "dropped_low_lexical"
        else:
            reason = "kept_renumbered" if offset[t] else "kept"
            kept.append((i, j))
        stats[reason] = stats.get(reason, 0) + 1
    return kept


def align(en: dict[Ref, str], es: dict[Ref, str], books: Iterable[str] | None = None):
    """Aligns two verse dictionaries chapter by chapter (see the module docstring).

    Args:
        en, es: `{(book, chapter, verse): text}` of the source and target texts.
        books: Only align these books (the models still learn from all).

    Returns:
        `(pairs, stats)`: the kept `Pair`s in the source's order and counts of beads and drops.
    """
    ids, vocab = _stemmer()
    en_ids, es_ids = {k: ids(t) for k, t in en.items()}, {k: ids(t) for k, t in es.items()}
    model = _fit(en, es, en_ids, es_ids, vocab)
    wanted = set(osis.BOOK_IDS if books is None else books)
    chapters_en: dict[tuple, list] = {}
    chapters_es: dict[tuple, list] = {}
    for verses, stem_ids, chapters in ((en, en_ids, chapters_en), (es, es_ids, chapters_es)):
        for (book, ch, v), text in verses.items():
            if book in wanted:
                chapters.setdefault((book, ch), []).append((v, text, stem_ids[book, ch, v]))
    pairs, stats = [], {"kept": 0, "kept_renumbered": 0}
    for (book, ch), a in chapters_en.items():
        if not (b := chapters_es.get((book, ch))):
            stats["unmatched_chapters"] = stats.get("unmatched_chapters", 0) + 1
            continue
        for i, j in _align_chapter(model, a, b, len(vocab), stats):
            pairs.append(Pair(book, ch, a[i][0], b[j][0], a[i][1], b[j][1]))
    renumbered = {f"{p.book}.{p.chapter}": None for p in pairs if p.en_verse != p.es_verse}
    stats["renumbered_chapters"] = list(renumbered)
    return pairs, stats
