"""No import cycles: the package's modules, read with `ast` (nothing is imported), form an acyclic graph.

An edge M -> X is an import of X in M, at the top of the module or inside a function (a function-level import that
closes a cycle is a cycle all the same: it only moves the failure to the first call). Importing a.b.c also runs the
packages a.b and a, except those that the importing module sits in (they are already being imported). Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import domainprune

ROOT = Path(domainprune.__file__).parent
PACKAGE = "domainprune"


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, top_level: bool):
    """Import statements of `tree`: all of them, or those that run when the module is imported."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _type_checking(node):
            stack.extend(node.orelse)
        elif not (top_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            stack.extend(ast.iter_child_nodes(node))


@cache
def graph(top_level: bool) -> dict[str, set[str]]:
    files = module_files()
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in _imports(ast.parse(path.read_text()), top_level):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)} | {package}
        deps = set()
        for target in targets:
            parts = target.split(".")
            deps |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} - own
        edges[name] = {d for d in deps if d in files and d != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_package():
    edges = graph(top_level=False)
    assert len(edges) > 60 and "domainprune.runfolder" in edges
    assert "domainprune.export" in edges["domainprune.runfolder"]  # a top-level relative import
    assert "domainprune.gguf_export" in edges["domainprune.exporters.gguf"]  # a function-level one, two levels up
    assert "domainprune.criteria" in edges["domainprune.pipeline"]  # importing criteria.depth runs criteria too
    assert "domainprune.criteria" not in edges["domainprune.criteria.flap"]  # its own package is already running
    assert "domainprune.exporters.gguf" not in graph(top_level=True)["domainprune.exporters"]  # lazy: a string


def test_top_level_imports_have_no_cycle():
    assert cycles(graph(top_level=True)) == []


def test_function_level_imports_add_no_cycle():
    assert cycles(graph(top_level=False)) == []


def test_the_entry_point_sits_above_the_planning_core():
    """`prune` hands over to streamed and training-aware pruning, which plan with pipeline: only `run` imports them."""
    edges = graph(top_level=False)
    assert {"domainprune.pipeline", "domainprune.streaming", "domainprune.training_aware.iterative"} <= edges[
        "domainprune.run"
    ]
    assert "domainprune.pipeline" in edges["domainprune.streaming"]
    assert "domainprune.pipeline" in edges["domainprune.training_aware.iterative"]
    assert not {"domainprune.run", "domainprune.streaming"} & edges["domainprune.pipeline"]
    assert "domainprune.training_aware.iterative" not in edges["domainprune.training_aware"]


def test_depth_neither_imports_pipeline_nor_the_criteria_that_run_it():
    edges = graph(top_level=False)
    assert "domainprune.pipeline" not in edges["domainprune.depth"]
    assert "domainprune.criteria" not in edges["domainprune.depth"]
    assert "domainprune.depth" in edges["domainprune.criteria.depth"]
