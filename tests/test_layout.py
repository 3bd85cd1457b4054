"""The layout shows the pipeline: a folder per step, imports in one direction, small modules.

The import graph is read from the source (every ``import`` and ``from ... import`` statement,
those inside functions and under ``TYPE_CHECKING`` included), with each step folder, ``passes/``
and each module at the top of fxsd/ as one node; docs/design.md ("Imports go one way") states
the order tested here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first: a node may import only nodes before it (and itself).
LAYERS = [
    {"errors", "arguments", "record", "preserve", "graph_module", "graph_names", "module_tree",
     "_lazy"},
    {"tracing"}, {"runtime"}, {"analysis"}, {"decisions"}, {"passes"}, {"checks"},
    {"transform"}, {"training"}, {"pruning"}, {"tools"}, {"__init__", "__main__"},
]
RANK = {node: i for i, layer in enumerate(LAYERS) for node in layer}


def _sources() -> dict[str, Path]:
    """Dotted module name -> file, for fxsd/ and passes/ (installed as fxsd.passes)."""
    found = {}
    for path in [*(ROOT / "fxsd").rglob("*.py"), *(ROOT / "passes").glob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "passes":
            parts.insert(0, "fxsd")
        if parts[-1] == "__init__" and len(parts) > 1 and parts != ["fxsd", "__init__"]:
            parts.pop()
        found[".".join(parts)] = path
    return found


def _node(module: str) -> str:
    """The graph node of a dotted module: its step folder, ``passes``, or the top-level module."""
    parts = module.split(".")
    return "__init__" if parts == ["fxsd"] else parts[1]


def _imports(path: Path, package: str) -> list[tuple[str, int]]:
    """The fxsd modules ``path`` imports, resolved to modules or packages, with line numbers."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base == "fxsd" or base.startswith("fxsd."):
                out += [(f"{base}.{alias.name}" if base == "fxsd" else base, node.lineno)
                        for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names
                    if alias.name == "fxsd" or alias.name.startswith("fxsd.")]
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    sources = _sources()
    edges: dict[tuple[str, str], list[str]] = {}
    for module, path in sources.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target, line in _imports(path, package):
            while target not in sources and "." in target:  # a name imported from a module
                target = target.rpartition(".")[0]
            a, b = _node(module), _node(target)
            if a != b:
                edges.setdefault((a, b), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_every_node_has_a_layer():
    nodes = {n for edge in _edges() for n in edge} | {_node(m) for m in _sources()}
    assert nodes <= set(RANK), sorted(nodes - set(RANK))


def test_imports_go_one_way():
    upward = {f"{a} -> {b}": where for (a, b), where in _edges().items()
              if RANK[b] > RANK[a] or (RANK[b] == RANK[a] and len(LAYERS[RANK[a]]) == 1)}
    assert not upward, upward


def test_no_import_cycle_between_folders():
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's body in lines, from its first statement after the docstring (a public entry
    point's signature and docstring list each of its arguments)."""
    body = function.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        body = body[1:]
    return function.end_lineno - body[0].lineno + 1


def test_module_and_function_sizes():
    top = sorted(p.name for p in (ROOT / "fxsd").glob("*.py"))
    assert len(top) <= 12, top
    long_modules, long_functions = [], []
    for path in _sources().values():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 60:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_public_surface_is_what_a_user_calls():
    import fxsd

    assert len(fxsd.__all__) <= 36
    assert {"stochastic_depth", "check", "prune", "strip", "table"} <= set(fxsd.__all__)
    assert not [name for name in fxsd.__all__ if name.endswith("Warning")]
    for name in fxsd.__all__:
        assert getattr(fxsd, name) is not None
