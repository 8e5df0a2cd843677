"""The README and docs/ point at what exists: every relative link reaches a file (and a heading,
when it names one), every command shown runs a script or module of the repository with flags it
defines, and the code layout names the modules there are, in the order of the layers.

What is checked, in ```bash (or untagged) blocks and in `inline code`:

- `python X.py ...`, `python -m pkg.mod ...`, `bash scripts/X.sh`: the script or module exists.
- Every `--flag` of such a command is one the script defines: absl's flags for train.py,
  decode.py and convert.py (their ``define_flags()``, run in a fresh process), argparse's for
  the others (plots.py, bench/*.py, ``python -m training.average``, ...; read from the source).
  A `--flag` in inline code on its own must be a flag of one of them.
- `--config=FILE` exists, and every `--config.A.B=V` names a field of that config (or of
  ``configs/common.py``'s base config when no file is given); an upper-case part (`FIELD`) is a
  placeholder and matches anything.
- Inline `dir/file` paths into the repository and `pkg.module` (or `pkg.module.attr`) names
  resolve; ``python`` blocks are not commands (tests/test_readme.py runs them).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO
from tests.test_layers import LAYERS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ABSL_SCRIPTS = ("train", "decode", "convert")
ABSL_BUILTIN = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok"}
PACKAGES = [name for layer in LAYERS for name in layer if (REPO / name / "__init__.py").exists()]
# The packages whose every module the code layout names (configs/ holds configurations).
LIBRARY = [name for name in PACKAGES if name not in ("configs", "bench", "tests")]
# File names that look like dotted module names (`model.bin`, `config.json`).
FILE_SUFFIX = r"\.(bin|json|jsonl|md|model|npy|png|py|safetensors|spm|txt)$"
MAX_CELL = 300  # characters in one table cell: longer detail goes in the prose below a table


# --- reading Markdown -----------------------------------------------------------------------

FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)


def code_blocks(text: str) -> list[tuple[str, str]]:
    return FENCE.findall(text)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def inline_code(text: str) -> list[str]:
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(text))]


def links(text: str) -> list[str]:
    outside = re.sub(r"`[^`]+`", "", prose(text))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", outside)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(text), re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def shell_lines(text: str) -> list[str]:
    """Command lines of the shell blocks (continuations joined, comments cut) and the inline
    code spans."""
    lines = []
    for lang, body in code_blocks(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        lines += [re.sub(r"(^|\s)#.*", "", line).strip() for line in body.splitlines()]
    return [line for line in lines + inline_code(text) if line]


def commands(line: str) -> list[list[str]]:
    """The commands of one line (split at pipes, ``&&`` and ``;``), as argument lists."""
    out = []
    for part in re.split(r"\s(?:\|\||&&|\||;)\s", line):
        try:
            out.append(shlex.split(part))
        except ValueError:  # an unbalanced quote in prose: words will do
            out.append(part.split())
    return out


# --- what the repository defines ------------------------------------------------------------


@dataclass
class Tools:
    flags: dict[str, set[str]]  # script or module -> the flags it takes, without dashes

    @functools.cached_property
    def every_flag(self) -> set[str]:
        return set().union(*self.flags.values())


def absl_flags() -> dict[str, set[str]]:
    """The flags train.py, decode.py and convert.py define, read by absl in a fresh process."""
    code = f"""
import json
from absl import flags
out = {{}}
for name in {ABSL_SCRIPTS!r}:
    before = set(flags.FLAGS)
    __import__(name).define_flags()
    names = set(flags.FLAGS)
    out[name] = sorted(names | {{"no" + f for f in names if flags.FLAGS[f].boolean}})
    for f in names - before:
        delattr(flags.FLAGS, f)
print(json.dumps(out))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    return {f"{name}.py": set(names) | ABSL_BUILTIN for name, names in found.items()}


def argparse_flags(path: Path) -> set[str] | None:
    """The ``--flags`` a file gives argparse's ``add_argument``; None if it uses none."""
    source = path.read_text()
    names = re.findall(r"add_argument\(\s*((?:\"-[^\"]+\"\s*,\s*)*\"-[^\"]+\")", source)
    if not names:
        return None
    flags = {f.lstrip("-") for group in names for f in re.findall(r"\"(-[^\"]+)\"", group)}
    return flags | {"help", "h"}


def module_file(module: str) -> Path | None:
    """The repository file ``python -m module`` runs, or None."""
    base = REPO / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def tools() -> Tools:
    flags = absl_flags()
    files = [p for p in REPO.glob("*.py")] + [
        p for name in [*PACKAGES, "bench"] for p in (REPO / name).rglob("*.py")
    ]
    for path in files:
        key = str(path.relative_to(REPO))
        if key not in flags and (found := argparse_flags(path)) is not None:
            flags[key] = found
    return Tools(flags)


@functools.cache
def config_of(path: str | None):
    """The ConfigDict of a config file (configs/X.py), or the base config for None."""
    if path is None:
        from configs.common import base_config

        return base_config()
    module = importlib.import_module(Path(path).with_suffix("").as_posix().replace("/", "."))
    return module.get_config()


# --- the checks -----------------------------------------------------------------------------


def config_field_problem(flag: str, config_file: str | None) -> str | None:
    """Why ``--config.A.B`` is not a field of the config, or None if it is."""
    import ml_collections

    node = config_of(config_file)
    for part in flag.split(".")[1:]:
        if re.fullmatch(r"[A-Z][A-Z_]*", part):  # a placeholder: FIELD
            return None
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return f"--{flag}: no such field in {config_file or 'configs/common.py'}"
        node = node[part]
    return None


def flag_problems(script: str, args: list[str], known: set[str] | None) -> list[str]:
    problems, config_file = [], None
    for arg in args:
        if m := re.search(r"--config=([\w./-]+\.py)", arg):
            config_file = m.group(1)
            if not (REPO / config_file).is_file():
                problems.append(f"{script}: --config={config_file} does not exist")
                config_file = None
    for arg in args:
        for flag in re.findall(r"(?<![\w-])--([A-Za-z][\w.-]*)", arg):
            if flag.startswith("config.") and script == "train.py":
                if problem := config_field_problem(flag, config_file):
                    problems.append(f"{script}: {problem}")
            elif known is None:
                problems.append(f"{script}: --{flag} shown, but its flags cannot be read")
            elif flag not in known:
                problems.append(f"{script}: --{flag} is not one of its flags")
    return problems


def without_variables(argv: list[str]) -> list[str]:
    """``argv`` without the ``VAR=value`` settings before the command."""
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    return argv


def command_problems(argv: list[str], tools: Tools) -> list[str]:
    if len(argv) >= 2 and argv[0] == "bash" and argv[1].endswith(".sh"):
        return [] if (REPO / argv[1]).is_file() else [f"bash {argv[1]}: no such script"]
    if not argv or argv[0] not in ("python", "python3") or len(argv) < 2:
        return []
    if argv[1] == "-m" and len(argv) >= 3:
        path = module_file(argv[2])
        if path is None:
            return [f"python -m {argv[2]}: no such module in the repository"]
        script, args = str(path.relative_to(REPO)), argv[3:]
    elif argv[1].endswith(".py"):
        if not (REPO / argv[1]).is_file():
            return [f"python {argv[1]}: no such script"]
        script, args = argv[1], argv[2:]
    else:  # python -c ..., python --version: not a command of the repository
        return []
    return flag_problems(script, args, tools.flags.get(script))


def span_problems(span: str, tools: Tools) -> list[str]:
    """Inline code that is not a command: a lone flag, a path, a dotted module name."""
    problems = []
    if span.startswith("--"):
        for flag in re.findall(r"(?<![\w-])--([A-Za-z][\w.-]*)", span):
            if flag.startswith("config."):
                if problem := config_field_problem(flag, None):
                    problems.append(problem)
            elif flag not in tools.every_flag:
                problems.append(f"--{flag}: not a flag of any script or benchmark")
    elif re.fullmatch(r"\.?[\w-]+(/[\w.-]+)+/?", span) and not re.search(r"[A-Z]{3,}", span):
        if span.split("/")[0] in tracked_top_level() and not (REPO / span).exists():
            problems.append(f"{span}: no such file or directory")
    elif (m := re.fullmatch(r"((\w+)(\.\w+)+)", span)) and not re.search(FILE_SUFFIX, span):
        if m.group(2) in [*PACKAGES, "bench"] and not resolves(m.group(1)):
            problems.append(f"{span}: no such module or attribute")
    return problems


@functools.cache
def tracked_top_level() -> set[str]:
    """The repository's tracked top-level files and directories (not runs/ and the like)."""
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return {line.split("/")[0] for line in out.splitlines()}


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if module_file(".".join(parts[:i])) is not None:
            obj = importlib.import_module(".".join(parts[:i]))
            return all((obj := getattr(obj, a, None)) is not None for a in parts[i:])
    return False


def link_problems(page: Path, text: str) -> list[str]:
    problems = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"link {target}: no such file")
        elif REPO not in [file, *file.parents]:
            problems.append(f"link {target}: outside the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"link {target}: no heading with that anchor in {path or page.name}")
    return problems


def problems(page: Path, text: str, tools: Tools) -> list[str]:
    found = link_problems(page, text)
    spans = set(inline_code(text))
    for line in shell_lines(text):
        argvs = [without_variables(argv) for argv in commands(line)]
        if any(argv[:1] in (["python"], ["python3"], ["bash"]) for argv in argvs):
            found += [p for argv in argvs for p in command_problems(argv, tools)]
        elif line in spans:
            found += span_problems(line, tools)
    return [f"{page.relative_to(REPO)}: {p}" for p in dict.fromkeys(found)]


def layout_problems(readme: str) -> list[str]:
    """The README's code layout: each module it names exists in a package of its bullet, each
    module of the library is named in its package's bullet, the layers come bottom to top."""
    section = readme.split("## Code layout")[1].split("\n## ")[0]
    bullets = re.findall(r"^- (.*?)(?=^- |^\S|\Z)", section, re.S | re.M)
    problems, named = [], {name: set() for name in LIBRARY}
    for bullet in bullets:
        packages = re.findall(r"`(\w+)/`", bullet)
        for module in re.findall(r"`(\w+)\.py`", bullet):
            homes = [REPO / p / f"{module}.py" for p in packages] + [REPO / f"{module}.py"]
            if not any(home.is_file() for home in homes):
                problems.append(f"code layout: {module}.py is in none of {packages} nor at the top")
            for p in packages:
                if p in named and (REPO / p / f"{module}.py").is_file():
                    named[p].add(module)
    for package, modules in named.items():
        there = {p.stem for p in (REPO / package).glob("*.py")} - {"__init__"}
        if there - modules:
            problems.append(f"code layout: {package}/ does not name {sorted(there - modules)}")
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    first = dict.fromkeys(n for n in re.findall(r"`(\w+)(?:/|\.py)`", section) if n in rank)
    order = [rank[n] for n in first]
    if order != sorted(order):
        problems.append(
            "code layout: the packages are not listed bottom to top (tests/test_layers.py)"
        )
    return problems


# --- the tests ------------------------------------------------------------------------------


def test_every_link_command_flag_and_path_in_the_readme_and_docs_exists():
    found = [p for page in PAGES for p in problems(page, page.read_text(), tools())]
    assert not found, "\n".join(found)
    # The checks saw what they check (a page that lost its commands would pass vacuously).
    lines = [line for page in PAGES for line in shell_lines(page.read_text())]
    shown = [argv[:2] for line in lines for argv in commands(line)]
    for script in ("train.py", "decode.py", "convert.py", "plots.py"):
        assert ["python", script] in shown, script
    assert sum(len(links(page.read_text())) for page in PAGES) >= 30
    assert set(tools().flags) >= {"train.py", "decode.py", "convert.py", "plots.py"}


def test_the_checks_report_made_up_links_commands_flags_and_fields():
    page = REPO / "docs" / "made_up.md"
    text = """# Made up

See [this](no_such_page.md), [that](../README.md#no-such-heading), [ok](../README.md#code-layout)
and [the web](https://example.com/x.md).

```bash
python no_such_script.py --x=1
python -m bench.no_such_benchmark
bash scripts/no_such.sh
python decode.py --workdir=runs/x --no_such_flag=3 --beam_size=4
python train.py --config=configs/tiny.py --config.no_such_field=1 --config.model.overrides.FIELD=1
python train.py --config=configs/no_such_config.py
python plots.py curves --workdir=runs/x --out=x.png --no_such_plot_flag
python -m bench.compile_memory --presets tiny --no_such_bench_flag 1
```

Inline: `python convert.py --input=workdir:a --output=marian:b --nonsense`,
`--config.model.overrides.no_field=1`, `--no_such_lone_flag`, `model/no_such_module.py`,
`decoding.no_such_module`, `interop.ctranslate2_run.no_such_function`, `--noreuse_host_memory`,
`decoding.cache`, `data/fixtures/bible-en-es-tiny`.
"""
    found = "\n".join(problems(page, text, tools()))
    expected = [
        "link no_such_page.md: no such file",
        "link ../README.md#no-such-heading: no heading with that anchor",
        "python no_such_script.py: no such script",
        "python -m bench.no_such_benchmark: no such module",
        "bash scripts/no_such.sh: no such script",
        "decode.py: --no_such_flag is not one of its flags",
        "train.py: --config.no_such_field: no such field in configs/tiny.py",
        "train.py: --config=configs/no_such_config.py does not exist",
        "plots.py: --no_such_plot_flag is not one of its flags",
        "bench/compile_memory.py: --no_such_bench_flag is not one of its flags",
        "convert.py: --nonsense is not one of its flags",
        "--config.model.overrides.no_field: no such field in configs/common.py",
        "--no_such_lone_flag: not a flag of any script or benchmark",
        "model/no_such_module.py: no such file or directory",
        "decoding.no_such_module: no such module or attribute",
        "interop.ctranslate2_run.no_such_function: no such module or attribute",
    ]
    for problem in expected:
        assert problem in found, f"not reported: {problem}\n{found}"
    assert len(found.splitlines()) == len(expected), found  # and nothing that is right
    for right in ("code-layout", "example.com", "beam_size", "FIELD", "noreuse", "cache"):
        assert right not in found, right


def test_the_code_layout_names_every_module_in_layer_order():
    readme = (REPO / "README.md").read_text()
    assert not layout_problems(readme), "\n".join(layout_problems(readme))
    # It can fail: an old module name, a module left out, two layers swapped.
    broken = readme.replace("`hardware.py`", "`old_hardware.py`")
    assert any("old_hardware.py is in none" in p for p in layout_problems(broken))
    assert any("runtime/ does not name ['hardware']" in p for p in layout_problems(broken))
    swapped = readme.replace("- `runtime/`", "- `training/` first, then `runtime/`", 1)
    assert any("bottom to top" in p for p in layout_problems(swapped))


def test_no_table_cell_is_longer_than_a_short_paragraph():
    long = []
    for page in PAGES:
        for number, line in enumerate(prose(page.read_text()).splitlines(), 1):
            if line.startswith("|"):
                long += [
                    f"{page.name}:{number}: {len(c.strip())} characters: {c.strip()[:60]}..."
                    for c in line.strip().strip("|").split(" | ")
                    if len(c.strip()) > MAX_CELL
                ]
    assert not long, "\n".join(long)


def test_the_readme_is_what_a_newcomer_needs_first():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("training", "decoding", "interop", "family", "reliability", "benchmarks"):
        assert f"](docs/{page}.md)" in readme, page
