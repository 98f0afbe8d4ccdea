"""The package reads as its architecture: imports flow one way, modules and functions stay small."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_cbwc"
#: the op-rule table stays one file: one table is the point
LONG_MODULES_ALLOWED = {"analysis/rules.py"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
#: layers, lowest first: a module may import its own layer's modules and those of lower layers only
LAYERS = [
    {"errors", "inputs", "timing"},
    {"verify", "norm", "centering", "examples", "specs", "data"},
    {"analysis"},
    {"surgery"},
    {"folding"},
    {"training"},
    {"export"},
    {"lightning"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lightning_cbwc module ``name`` imports (at any depth: lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the package's own __init__: the public API, above everything
    top = parts[1]
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_flow_down_the_layers():
    upward = []
    for name, deps in _graph().items():
        mine = _layer(name)
        for dep in deps:
            theirs = _layer(dep)
            if mine is not None and (theirs is None or theirs > mine):
                upward.append(f"{name} imports {dep}")
    assert not upward, "\n".join(sorted(upward))


def test_every_module_has_a_layer():
    missing = [n for n in _modules() if n != "lightning_cbwc" and _layer(n) is None]
    assert not missing, f"add these to LAYERS: {missing}"


def test_modules_and_functions_are_small():
    too_long = []
    for path in _modules().values():
        rel = str(path.relative_to(PACKAGE))
        source = path.read_text()
        if rel not in LONG_MODULES_ALLOWED and source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "\n".join(too_long)


def test_no_module_is_shadowed_by_what_its_package_exports():
    """``pkg.name`` is the module ``pkg/name.py``, never a function of the same name (which would force
    ``importlib.import_module`` on whoever wants the module)."""
    shadowed = []
    for name in _modules():
        if "." not in name:
            continue
        module = importlib.import_module(name)
        parent, _, attr = name.rpartition(".")
        if getattr(importlib.import_module(parent), attr) is not module:
            shadowed.append(name)
    assert not shadowed, shadowed
