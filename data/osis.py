"""SWORD Bible modules to clean, verse-numbered plain text.

`ensure_sword` installs the modules and `mod2imp` with apt where they are missing, and
`dump_module` runs `mod2imp MODULE`, which prints the module as an "imp" file: a `$$$Book C:V`
key line, then the verse's OSIS markup. `parse_imp` turns that into `(book, chapter, verse,
raw_osis)` records with OSIS book ids, and `clean_osis` turns one verse's markup into one line
of plain text:

* `<note>` (footnotes, cross-references) is dropped with its content.
* `<title>` (section headings) is dropped with its content, except psalm superscriptions
  (`type="psalm"`), whose text is kept: the Reina-Valera 1909 has them as plain verse text, so
  dropping them on the English side would leave verse 1 of over 100 psalms misaligned.
* `<speaker>` (Song of Songs speaker labels, not part of the text) is dropped with its content.
* Structural tags (`div`, `l`, `lg`, `lb`, `p`, `chapter`, `milestone`, ...) become a space.
* All other tags are removed and their text kept: `<w lemma="strong:H0430" morph=...>`
  (Strong's numbers and morphology), `<transChange>`, `<q>`, `<seg>`, `<divineName>`, ...
* XML entities are decoded, the text is NFC-normalised and runs of white space (including
  no-break and zero-width spaces) become one space.
"""

from __future__ import annotations

import html
import logging
import os
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_MODULE, TARGET_MODULE = "engWEB2015eb", "spaRV1909eb"  # World English Bible, RV 1909
APT_PACKAGES = ("sword-text-web", "sword-text-sparv", "libsword-utils")
APT_COMMAND = "apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
ENV_VAR = "AIAYN_DEFAULT_CORPUS"
_SWORD_DIRS = (Path("/usr/share/sword"), Path("~/.sword").expanduser())

# The 66 books both modules share, in canonical order: (OSIS id, name as mod2imp prints it
# under an English/C locale). The WEB's deuterocanonical books have no Spanish counterpart.
BOOKS: tuple[tuple[str, str], ...] = (
    ("Gen", "Genesis"), ("Exod", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deut", "Deuteronomy"), ("Josh", "Joshua"), ("Judg", "Judges"), ("Ruth", "Ruth"),
    ("1Sam", "I Samuel"), ("2Sam", "II Samuel"), ("1Kgs", "I Kings"), ("2Kgs", "II Kings"),
    ("1Chr", "I Chronicles"), ("2Chr", "II Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Esth", "Esther"), ("Job", "Job"), ("Ps", "Psalms"),
    ("Prov", "Proverbs"), ("Eccl", "Ecclesiastes"), ("Song", "Song of Solomon"),
    ("Isa", "Isaiah"), ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Ezek", "Ezekiel"),
    ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"),
    ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nah", "Nahum"),
    ("Hab", "Habakkuk"), ("Zeph", "Zephaniah"), ("Hag", "Haggai"), ("Zech", "Zechariah"),
    ("Mal", "Malachi"), ("Matt", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"),
    ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"), ("1Cor", "I Corinthians"),
    ("2Cor", "II Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phil", "Philippians"), ("Col", "Colossians"), ("1Thess", "I Thessalonians"),
    ("2Thess", "II Thessalonians"), ("1Tim", "I Timothy"), ("2Tim", "II Timothy"),
    ("Titus", "Titus"), ("Phlm", "Philemon"), ("Heb", "Hebrews"), ("Jas", "James"),
    ("1Pet", "I Peter"), ("2Pet", "II Peter"), ("1John", "I John"), ("2John", "II John"),
    ("3John", "III John"), ("Jude", "Jude"), ("Rev", "Revelation of John"),
)  # fmt: skip
BOOK_IDS: tuple[str, ...] = tuple(osis for osis, _ in BOOKS)
_OSIS_OF_NAME = {name: osis for osis, name in BOOKS}

_KEY = re.compile(r"^\$\$\$(.+) (\d+):(\d+)$")

# A footnote often sits between two words with no space on either side
# ('God</w><note>..</note><w>created'); it is first replaced by this marker so that a space can
# be put back where it separated two words, and nothing where it was beside a space.
_GAP = "\x01"
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_EMPTY_NOTE = re.compile(r"<note\b[^>]*/>")
_TITLE = re.compile(r"<title\b([^>]*)>(.*?)</title>", re.S)
_SPEAKER = re.compile(r"<speaker\b[^>]*>.*?</speaker>", re.S)
_BLOCK_TAG = re.compile(
    r"</?(?:div|l|lg|lb|p|chapter|milestone|item|list|title|speaker|table|row|cell|head)\b"
    r"[^>]*>"
)
_ANY_TAG = re.compile(r"<[^>]*>")
_GAP_AFTER_SPACE = re.compile(r"(?:(?<=\s)|^)" + _GAP + "+")
_GAP_BEFORE_WORD = re.compile(_GAP + r"+(?=[\w“‘\[(])")
_SPACES = re.compile(r"[\s\u00a0\u200b\ufeff]+")
# Removing a structural tag between a word and its punctuation leaves 'word ,'.
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])(?=\s|$)")

# RV1909 tags words and translator additions separately and often writes them with no space
# between ('engendró</w><transChange>un hijo'): a space is needed there, except where the
# second element is an enclitic pronoun written onto a verb ('sáca</w><transChange>lo').
_ADJACENT = re.compile(r"([^<>\s]*)</(w|transChange)>(<(w|transChange)\b[^>]*>)([^<\s]*)")
_ENCLITICS = re.compile(r"(?:me|te|se|nos|os|lo|la|le|los|las|les)+")
_VERB_ENDING = re.compile(r"(?:ar|er|ir|ad|ed|id|ndo|me|te|nos)$|[áéíóú]")
# Accented words ending like a verb that are not verbs (so 'allí</w><transChange>la' is split).
_NOT_VERBS = frozenset(
    "jehová josué ejército cuánto después también está allí aquí así él más según sí dios".split()
)


def parse_imp(lines: Iterable[str]) -> Iterator[tuple[str, int, int, str]]:
    """Splits a `mod2imp` dump into verses.

    Module and testament headings, book and chapter introductions (chapter or verse 0) and the
    books outside `BOOKS` are skipped.

    Args:
        lines: The dump's lines (trailing newlines allowed).

    Yields:
        `(osis_book, chapter, verse, raw_osis)` in the module's order.
    """
    key: tuple[str, int, int] | None = None
    body: list[str] = []
    for line in [*lines, "$$$[ end ]"]:
        line = line.rstrip("\n")
        if not line.startswith("$$$"):
            body.append(line)
            continue
        if key is not None:
            yield (*key, "\n".join(body))
        key, body = None, []
        match = _KEY.match(line)
        if match and match.group(1) in _OSIS_OF_NAME:
            chapter, verse = int(match.group(2)), int(match.group(3))
            if chapter > 0 and verse > 0:
                key = (_OSIS_OF_NAME[match.group(1)], chapter, verse)


def _space_adjacent(match: re.Match[str]) -> str:
    left, close_kind, open_tag, open_kind, right = match.groups()
    if close_kind == open_kind:  # only the word/addition boundary is known to lose its space
        return match.group(0)
    stem = re.sub(r"\W+", "", left).lower()
    verb_like = bool(_VERB_ENDING.search(stem)) and stem not in _NOT_VERBS
    if verb_like and _ENCLITICS.fullmatch(right.lower()):
        return match.group(0)
    return f"{left}</{close_kind}> {open_tag}{right}"


def _title_text(match: re.Match[str]) -> str:
    return f" {match.group(2)} " if 'type="psalm"' in match.group(1) else " "


def clean_osis(raw: str) -> str:
    """Turns one verse of OSIS markup into plain text (see the module docstring).

    Args:
        raw: The verse's markup as `mod2imp` prints it.

    Returns:
        The verse text on one line, stripped; empty if the verse has no text.
    """
    # Only a <w> next to a <transChange> can need a space; most verses have neither.
    text = _ADJACENT.sub(_space_adjacent, raw) if "<transChange" in raw else raw
    text = _NOTE.sub(_GAP, text)
    text = _EMPTY_NOTE.sub("", text)
    text = _TITLE.sub(_title_text, text)
    text = _SPEAKER.sub(" ", text)
    text = _BLOCK_TAG.sub(" ", text)
    text = _ANY_TAG.sub("", text)
    text = html.unescape(text)
    if _GAP in text:
        text = _GAP_AFTER_SPACE.sub("", text)
        text = _GAP_BEFORE_WORD.sub(" ", text).replace(_GAP, "")
    text = unicodedata.normalize("NFC", text)
    text = _SPACES.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def read_module(lines: Iterable[str]) -> dict[tuple[str, int, int], str]:
    """Parses and cleans a whole dump.

    Args:
        lines: The lines of a `mod2imp` dump.

    Returns:
        `{(osis_book, chapter, verse): text}` in the module's order, without empty verses.
    """
    verses = {}
    for book, chapter, verse, raw in parse_imp(lines):
        text = clean_osis(raw)
        if text:
            verses[book, chapter, verse] = text
    return verses


class CorpusBuildError(RuntimeError):
    """The default corpus cannot be built on this machine (the message says what to do)."""


def _conf(module: str) -> Path | None:
    """The module's .conf file (SWORD finds modules through these), if installed."""
    for name in (f"{module}.conf", f"{module.lower()}.conf"):
        for conf in (d / "mods.d" / name for d in _SWORD_DIRS):
            if conf.is_file():
                return conf
    return None


def module_version(module: str) -> str | None:
    """The `Version=` of an installed module (None if not found)."""
    conf = _conf(module)
    versions = (
        re.findall(r"^Version=(.*)$", conf.read_text("utf-8", "replace"), re.M) if conf else []
    )
    return versions[0].strip() if versions else None


def _missing_sword() -> list[str]:
    missing = [] if shutil.which("mod2imp") else ["mod2imp (libsword-utils)"]
    missing += [f"the SWORD module {m}" for m in (SOURCE_MODULE, TARGET_MODULE) if not _conf(m)]
    return missing


def _cannot_build(missing: list[str], why: str) -> CorpusBuildError:
    return CorpusBuildError(
        "The default corpus (English->Spanish Bible verses) is built from Debian's SWORD "
        f"packages, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
        f"and {why}.\nEither install them as root:\n    {APT_COMMAND}\n"
        f"or set {ENV_VAR}=DIR to a prebuilt copy (DIR/train.en, train.es, dev.en, dev.es),\n"
        "or train on your own plain-text files (PREFIX.en / PREFIX.es, one sentence per line):\n"
        "    --config.data.source=text --config.data.train_prefix=PATH/train "
        "--config.data.dev_prefix=PATH/dev"
    )


def ensure_sword() -> str:
    """Installs the two modules and `mod2imp` with apt where missing.

    Returns:
        The path of `mod2imp`.

    Raises:
        CorpusBuildError: They are missing and apt-get is absent, we are neither root nor
            allowed password-less sudo, or the installation fails.
    """
    if not (missing := _missing_sword()):
        return shutil.which("mod2imp")
    if not shutil.which("apt-get"):
        raise _cannot_build(missing, "apt-get is not available on this machine")
    if os.geteuid() == 0:
        sudo = []
    elif (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    ):
        sudo = ["sudo", "-n"]
    else:
        raise _cannot_build(missing, "installing them needs root (or password-less sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess:
        log.info("running %s", " ".join([*sudo, "apt-get", *args]))
        return subprocess.run([*sudo, "apt-get", *args], env=env, capture_output=True, text=True)

    done = apt(*APT_COMMAND.split()[1:])
    if done.returncode != 0:  # a fresh machine (a container) may have no package lists yet
        done = apt("update")
        done = apt(*APT_COMMAND.split()[1:]) if done.returncode == 0 else done
    if done.returncode != 0:
        why = f"`{' '.join(done.args)}` failed:\n{done.stdout[-1000:]}{done.stderr[-2000:]}"
        raise _cannot_build(missing, why)
    if missing := _missing_sword():
        raise _cannot_build(missing, f"`{APT_COMMAND}` did not install them")
    return shutil.which("mod2imp")


def dump_module(mod2imp: str, module: str) -> dict[tuple[str, int, int], str]:
    """Dumps a module with `mod2imp` and cleans it.

    Args:
        mod2imp: The path of `mod2imp`.
        module: The SWORD module name.

    Returns:
        `{(osis_book, chapter, verse): text}` (see `read_module`).

    Raises:
        CorpusBuildError: `mod2imp` failed or gave fewer than the 66 books.
    """
    # mod2imp prints book names in the locale's language; BOOKS has the English ones.
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "LANGUAGE": ""}
    done = subprocess.run([mod2imp, module], env=env, capture_output=True)
    verses = read_module(done.stdout.decode("utf-8").splitlines())
    if done.returncode != 0 or len({book for book, _, _ in verses}) < len(BOOKS):
        raise CorpusBuildError(
            f"`mod2imp {module}` exited with {done.returncode} and gave {len(verses)} verses, "
            f"not all {len(BOOKS)} books: {done.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    return verses
