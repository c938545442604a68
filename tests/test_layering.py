"""The package's import graph: no circles between modules or subpackages, and the runtime never
reaches up into the stages that produce artifacts."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ldm_deploy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports anywhere (function-level imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def _subpackage(module: str) -> str:
    return module.split(".")[1] if "." in module else "(root)"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_between_modules():
    assert len(GRAPH) > 40 and GRAPH["ldm_deploy.bench.report"]  # the graph was really read
    assert _cycles(GRAPH) == []


def test_no_import_circles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        graph.setdefault(_subpackage(module), set()).update(_subpackage(d) for d in deps)
    for k, deps in graph.items():
        deps.discard(k)
    assert _cycles(graph) == []


def test_runtime_does_not_import_the_stages_above_it():
    above = {"export", "quantize", "prune", "bench", "models", "quality", "serve"}
    for module, deps in GRAPH.items():
        if _subpackage(module) in ("runtime", "tensorrt", "specs", "artifact", "errors", "numerics"):
            assert not {_subpackage(d) for d in deps} & above, (module, sorted(deps))


def test_serve_sits_on_the_runtime_only():
    """ldm-serve runs artifacts: it may use the runtime, never the torch-side stages."""
    serve = {m: deps for m, deps in GRAPH.items() if _subpackage(m) == "serve"}
    assert len(serve) >= 6 and any(_subpackage(d) == "runtime" for deps in serve.values() for d in deps)
    for module, deps in serve.items():
        assert not {_subpackage(d) for d in deps} & {"export", "quantize", "prune", "bench", "models", "quality"}, \
            (module, sorted(deps))
