"""No import circle in ``liverseg`` and no import that runs back up to the command line: every
import counts (module level or inside a function, as in test_dvc_deps), TYPE_CHECKING aside."""

from __future__ import annotations

from pathlib import Path

from test_dvc_deps import SRC, imported_names, module_file


def import_graph() -> dict[str, set[str]]:
    """Module name -> the ``liverseg`` modules it imports (packages by their ``__init__``)."""
    files = {
        ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted((SRC / "liverseg").rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {m for m in imported_names(path) if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with each subpackage's modules taken as one node (``liverseg.training``)."""

    def node(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else name

    out: dict[str, set[str]] = {}
    for name, deps in graph.items():
        out.setdefault(node(name), set()).update(node(m) for m in deps if node(m) != node(name))
    return out


def test_training_tuning_and_workers_are_in_no_package_circle() -> None:
    """``workers.py`` serves training and tuning and imports neither (it imported the training
    package's MLflow helpers, and the CLI)."""
    mine = {"liverseg.training", "liverseg.tuning", "liverseg.workers", "liverseg.tracking"}
    assert [c for c in cycles(package_graph(import_graph())) if mine & set(c)] == []


def test_the_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_the_command_line() -> None:
    """Only the CLI imports the stage modules, and nothing imports the CLI."""
    up = {
        name: sorted(m for m in deps if m == "liverseg.cli" or m.startswith("liverseg.stages."))
        for name, deps in import_graph().items()
        if name != "liverseg.cli" and not name.startswith("liverseg.stages")
    }
    assert {k: v for k, v in up.items() if v} == {}


def test_the_files_are_found() -> None:
    assert module_file("liverseg.tracking") == SRC / "liverseg" / "tracking.py"
    assert Path(SRC / "liverseg" / "cli.py").is_file()
