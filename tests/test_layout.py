"""The layout of the package: no import circle, and the report's statistics without MLflow.

The import graph is read from the source (``ast``), every ``import`` counted wherever it stands:
at the top, inside a function (a lazy import still ties two modules together), or under
``TYPE_CHECKING``. An edge goes to the module named (``from art_study.study import execute``
names the submodule ``execute``; ``from art_study.study import run_study`` the package). A
package that loads its names lazily (``art_study.report``: a ``_EXPORTS`` table of name →
module) depends on every module of that table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "art_study"


def module_files() -> dict[str, Path]:
    """Every module of art_study by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The art_study modules ``name`` imports, and the other top-level packages it imports."""
    ours, others = set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:  # a lazy package: _EXPORTS = {name: its module, ...}
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS"
                                                for t in node.targets):
            ours |= {f"{name}.{module}" for module in ast.literal_eval(node.value).values()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "art_study":
                others.add(target.split(".")[0])
                continue
            while target not in modules:  # import a.b.c of a name c: the module a.b
                target = target.rpartition(".")[0]
            ours.add(target)
    ours.discard(name)
    return ours, others


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = module_files()
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(name, path, modules)
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    """Not a vacuous graph: a top-level import, one inside a function and a lazy package's
    table each give their edge, and a circle is found."""
    graph, external = import_graph()
    assert "art_study.study.executor" in graph["art_study.study.local_backend"]
    assert "art_study.study.lease" in graph["art_study.study.execute"]  # inside a function
    assert "art_study.report" in graph["art_study.cli"]
    assert "art_study.report.document" in graph["art_study.report"]  # loaded lazily
    assert "mlflow" in external["art_study.report.reading"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_report_statistics_need_no_mlflow() -> None:
    """The statistics are plain functions: neither they nor what they import reach MLflow (or
    TensorFlow), and importing them alone loads neither (the package imports lazily)."""
    graph, external = import_graph()
    reach, todo = set(), ["art_study.report.statistics"]
    while todo:
        module = todo.pop()
        if module not in reach:
            reach.add(module)
            todo += graph[module]
    used = set().union(*(external[m] for m in reach))
    assert not used & {"mlflow", "keras", "tensorflow"}, used
    code = ("import sys, art_study.report.statistics; "
            "print(sorted({'mlflow', 'keras', 'tensorflow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
