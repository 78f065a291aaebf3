"""The package's shape: no import cycles (function-level imports counted), no long functions."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "qconvert"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path], name: str | None = None) -> set[str]:
    """qconvert modules that ``path`` imports anywhere (module level or inside functions)."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names} & set(modules)
            found |= submodules  # `from . import flux` imports the module qconvert.flux ...
            if target in modules and len(submodules) < len(node.names):
                found.add(target)  # ... `from . import check_options` a name of the package's own
    return found - {name}


def _cycles() -> list[list[str]]:
    modules = _modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_finder_sees_function_level_imports(tmp_path):
    """Guard the guard: an import inside a function is an edge of the graph."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    from . import c\n")
    modules = {m: tmp_path / f"{m[-1]}.py" for m in ("qconvert.a", "qconvert.b", "qconvert.c")}
    assert _imports(tmp_path / "a.py", modules, name="qconvert.a") == {"qconvert.b", "qconvert.c"}


def _long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    assert _long_functions() == []
