"""The repository stands on its own: no paths outside it, its fixture corpus, no skipped tests."""

import re
import subprocess
import sys

from configs.tiny import CORPUS
from tests.conftest import REPO

# The sibling directory, however a path to it is spelled (the spellings are in
# test_every_spelling_of_the_sibling_directory_is_caught). Spelled in pieces so this file does
# not match itself.
SHARED = "sha" + "red"
QUOTE = r"['\"]"
OUTSIDE = re.compile(
    "|".join(
        [
            r"\.\./+" + SHARED,  # a relative path string
            rf"{QUOTE}\.\.{QUOTE}\s*,\s*{QUOTE}" + SHARED,  # os.path.join's arguments
            rf"{QUOTE}\.\.{QUOTE}\s*\)\s*/\s*{QUOTE}" + SHARED,  # a Path joined with /
            rf"(parents\[\s*\d+\s*\]|\.parent)\s*/\s*{QUOTE}" + SHARED,  # a parent's child
            SHARED + "/corpus",
        ]
    )
)


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [name for name in out.split("\0") if name]


def test_no_tracked_file_reads_outside_the_repository():
    offenders = []
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_every_spelling_of_the_sibling_directory_is_caught():
    dots = ".."
    caught = [
        f"open('{dots}/{SHARED}/x')",
        f'os.path.join("{dots}", "{SHARED}", "corpus")',
        f'Path("{dots}") / "{SHARED}"',
        f"Path(__file__).resolve().parents[2] / '{SHARED}'",
        f'here.parent.parent / "{SHARED}"',
    ]
    assert all(OUTSIDE.search(line) for line in caught)
    assert not OUTSIDE.search(f'Path("runs") / "{SHARED}_vocab"')  # no sibling directory


def test_fixture_corpus_is_small_parallel_and_licensed():
    files = sorted(p.name for p in CORPUS.iterdir())
    assert {"train.en", "train.es", "dev.en", "dev.es", "README.md"} <= set(files), files
    assert sum(p.stat().st_size for p in CORPUS.iterdir()) < 1_000_000
    for split, count in (("train", 2000), ("dev", 200)):
        sides = [
            (CORPUS / f"{split}.{lang}").read_text("utf-8").splitlines() for lang in ("en", "es")
        ]
        assert [len(side) for side in sides] == [count, count]
        assert all(line.strip() for side in sides for line in side)
    note = (CORPUS / "README.md").read_text("utf-8")
    assert "public domain" in note.lower() and "World English Bible" in note
    assert "Reina-Valera 1909" in note
    tracked = set(tracked_files())
    assert all(f"{CORPUS.relative_to(REPO)}/{f}" in tracked for f in files), "not committed"


def test_a_skipped_test_fails_the_suite(tmp_path):
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n\ndef test_that_skips():\n    pytest.skip('no widget here')\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir", str(tmp_path),
         "-c", "/dev/null", str(tmp_path / "test_skips.py")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 failed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
    assert "zero skips" in result.stdout and "no widget here" in result.stdout


def test_a_module_skipped_while_collecting_fails_alone(tmp_path):
    (tmp_path / "test_needs_widget.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_widget_module')\n\n\n"
        "def test_widget():\n    pass\n"
    )
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    assert True\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir", str(tmp_path),
         "-c", "/dev/null", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    last = result.stdout.splitlines()[-1]
    assert "1 failed, 1 passed" in last and "error" not in last, result.stdout[-2000:]
    assert "skipped modules are not allowed" in result.stdout
    assert "no_such_widget_module" in result.stdout


def test_every_test_the_reliability_table_names_exists():
    """docs/reliability.md's "What happens when" table: every test it names exists, and so does
    every row of tests/test_cli_mistakes.py's table it names (there and in the notes below it)."""
    from tests.test_cli_mistakes import ROWS

    page = (REPO / "docs" / "reliability.md").read_text()
    table = page.split("## What happens when")[1].split("\n## ")[0]
    rows = [
        line for line in table.splitlines() if line.startswith("| ") and "pinned by" not in line
    ]
    notes = table.split("More on some rows:")[1]
    mistakes = {str(row) for row in ROWS}
    row_names = [
        name
        for text in [row.rstrip(" |").split(" | ")[-1] for row in rows] + [notes]
        for name in re.findall(r"(?<![\w-])(?:train|decode|convert)-[a-z0-9_./=+-]*[a-z0-9]", text)
    ]
    assert len(row_names) >= 40, row_names
    assert not set(row_names) - mistakes, set(row_names) - mistakes
    assert len(rows) >= 15
    named = 0
    for row in rows:
        pinned = row.rstrip(" |").split(" | ")[-1]
        assert "test_" in pinned, row
        current = None
        for ref in re.findall(r"`([^`]+)`", pinned):
            file, _, name = ref.partition("::")
            current = file or current
            source = (REPO / "tests" / current).read_text()
            assert not name or re.search(rf"^def {name}\(", source, re.M), f"{current}::{name}"
            named += 1
    assert named >= 25
