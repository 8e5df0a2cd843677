"""The README's promises: CI runs its test command, and its model snippet runs as written."""

import re

import numpy as np

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^(bash scripts/test\.sh)\s+# the tests", README, re.M).group(1)
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def test_model_snippet_runs_as_written():
    snippet = re.search(r"## The model in five lines\n\n```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 4, 37000)
    assert np.isfinite(np.asarray(scope["logits"])).all()
