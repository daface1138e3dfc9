"""dvc.yaml lists every module a stage runs: otherwise DVC calls a stage up to date when it is not.

Each stage's command is ``liverseg <command>``; the import closure of what that command runs
(the console script's ``liverseg.cli``, the command's module from ``cli.COMMANDS`` and, through
them, every ``liverseg`` module they import, at module level or inside a function) must be
covered by the stage's ``deps``: the module's file, or a folder that contains it. Imports under
``if TYPE_CHECKING:`` never run and do not count; nor do empty package ``__init__.py`` files
(nothing in them can change a stage's behaviour; once one has code, it counts).
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from liverseg.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "liverseg"


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` inside src/, or None for anything outside it."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = SRC.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` may load (TYPE_CHECKING blocks aside)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from liverseg.data import ircad`` imports the submodule liverseg.data.ircad
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return names


def closure(roots: list[str]) -> set[Path]:
    """The files of every ``liverseg`` module the roots import, directly or not."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.extend(imported_names(f))
    return {f for f in seen if f.read_text().strip()}


def stage_commands() -> dict[str, str]:
    """Stage name -> the ``liverseg`` sub-command its cmd runs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        assert argv[0] == "liverseg", f"stage {name}: cmd does not start with liverseg"
        out[name] = argv[1]
    return out


def stage_deps(stage: str) -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [d if isinstance(d, str) else next(iter(d)) for d in stages[stage].get("deps", [])]


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    rel = sorted(f.relative_to(REPO).as_posix() for f in files)
    roots = [d.rstrip("/") for d in deps]
    return [f for f in rel if not any(f == d or f.startswith(d + "/") for d in roots)]


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_stage_deps_cover_its_import_closure(stage: str) -> None:
    command = stage_commands()[stage]
    files = closure([f"{PACKAGE}.cli", COMMANDS[command][0]])
    missing = uncovered(files, stage_deps(stage))
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs these modules but does not depend on them "
        f"(add them to its deps): {', '.join(missing)}"
    )


def test_closure_follows_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    """The closure sees a function-level import and ignores a TYPE_CHECKING one."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from liverseg.serving import X\n"
        "def f():\n    from liverseg.data import splits\n"
    )
    names = imported_names(src)
    assert "liverseg.data.splits" in names
    assert "liverseg.serving" not in names


def test_uncovered_names_a_module_missing_from_deps() -> None:
    files = closure([f"{PACKAGE}.stages.prepare"])
    deps = ["src/liverseg/stages/prepare.py", "src/liverseg/data"]
    missing = uncovered(files, deps)
    assert "src/liverseg/params.py" in missing
    assert not any(m.startswith("src/liverseg/data/") for m in missing)
