"""The packages form layers and import downward only: a cycle means a concern sits in the wrong
place. The order is written once, here; every import in the project is checked against it,
including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom first. A module may import its own package and any package of a lower layer, never one
# of its own layer or above.
LAYERS = (
    ("model", "data"),  # the blocks and the data pipeline, each on its own
    ("runtime",),  # dtype choice, host allocator, compilation caches
    ("workdirs",),  # a workdir's files, checkpoints, lock and loading
    ("decoding",),  # searches and Translator
    ("training",),  # the loop; its evaluation decodes
    ("interop",),  # conversions to and from other formats
    ("configs",),  # presets, read by train.py
    ("cli", "plots"),  # what the scripts share
    ("train", "decode", "convert", "serve", "predict"),  # the scripts
    ("bench",),
    ("tests",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _project_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level name)`` of every absolute import of a project module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in RANK]
    return found


def _owner(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_project_module_has_a_layer():
    owners = {_owner(p) for p in ROOT.glob("*.py")} | {
        p.parent.name for p in ROOT.glob("*/__init__.py")
    }
    assert owners - {"setup"} <= RANK.keys(), f"not in LAYERS: {owners - RANK.keys()}"


def test_imports_point_down_the_layers():
    upward = []
    files = [p for p in ROOT.glob("*.py")] + [
        p for name in RANK for p in (ROOT / name).rglob("*.py") if (ROOT / name).is_dir()
    ]
    for path in files:
        owner = _owner(path)
        for line, name in _project_imports(path):
            if name != owner and RANK[name] >= RANK[owner]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {owner} imports {name}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from training.step import loss\n")
    assert _project_imports(module) == [(2, "training")]
