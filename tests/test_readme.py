"""The README's promises: CI runs its test command, and its Python examples (and those of
docs/) run as written."""

import re
import textwrap

import numpy as np

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
# Where the ```python blocks run, in this order: (page, from heading, to heading). The README's
# model block builds the model that docs/model.md continues from (before the README's `load`
# names another `model`); every page of docs/ with a Python block is here.
SEQUENCE = (
    ("README.md", None, "## Translating from Python"),
    ("docs/model.md", None, None),
    ("docs/family.md", None, None),
    ("README.md", "## Translating from Python", None),
    ("docs/interop.md", None, None),
)


def section(page: str, start: str | None, end: str | None) -> str:
    text = (REPO / page).read_text()
    text = text if start is None else start + text.split(start, 1)[1]
    return text if end is None else text.split(end, 1)[0]


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^(bash scripts/test\.sh)\s+# the tests", README, re.M).group(1)
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, dedented (some sit inside a list item)."""
    return [textwrap.dedent(b) for b in re.findall(r"^ *```python\n(.*?)^ *```", text, re.S | re.M)]


def test_every_page_with_python_blocks_is_run():
    pages = {str(p.relative_to(REPO)) for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")]}
    with_blocks = {page for page in pages if python_blocks((REPO / page).read_text())}
    assert with_blocks == {page for page, _, _ in SEQUENCE}, with_blocks
    for page in with_blocks:  # every block of a page is in one of its sections, once
        parts = [section(*part) for part in SEQUENCE if part[0] == page]
        assert "".join(parts) == (REPO / page).read_text(), page


def test_every_python_example_runs_as_written(tiny_workdir, tmp_path):
    """The Python blocks of the README and docs/ run top to bottom in one namespace, as a
    reader pastes them, with their workdir paths pointing at a trained tiny workdir and a
    CTranslate2 export of it."""
    from interop.registry import convert
    from workdirs.files import read_model_config

    ct2 = tmp_path / "ct2"
    convert(f"workdir:{tiny_workdir}", f"ctranslate2:{ct2}")
    max_positions = read_model_config(tiny_workdir)[0].max_positions
    blocks = [
        (f"{page} ({start or 'start'}) python block {i + 1}", block)
        for page, start, end in SEQUENCE
        for i, block in enumerate(python_blocks(section(page, start, end)))
    ]
    assert len(blocks) >= 7
    scope: dict = {}
    for name, block in blocks:
        block = (
            block.replace('"runs/default-ct2"', repr(str(ct2)))
            .replace('"runs/default"', repr(str(tiny_workdir)))
            .replace("max_positions = 256", f"max_positions = {max_positions}")
        )
        exec(compile(block, name, "exec"), scope)
    # What the blocks promise, checked on what they computed.
    assert scope["logits"].shape[-1] == 8001  # the masked LM's, the last logits written
    assert np.isfinite(np.asarray(scope["logits"])).all()
    assert scope["classes"].shape == (1, 3)
    assert len(scope["best"]) == 2 and all(isinstance(t, str) for t in scope["best"])
    assert len(scope["translations"]) == 2
    assert all(isinstance(t, str) for t in scope["translations"])


def test_model_snippet_gives_the_shapes_it_promises():
    snippet = python_blocks(README.split("## The model in five lines")[1])[0]
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 4, 37000)
    assert np.isfinite(np.asarray(scope["logits"])).all()
