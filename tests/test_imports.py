"""The library's import graph has no cycle, and imports sit at the top of their files except the
few slow or optional ones that say why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# imported where they are needed: slow to import, optional, or absent on a bare GPU machine
LAZY = {"fvcore.nn", "jsonschema", "scipy.io", "sklearn.datasets", "torchvision", "torch._utils", "io"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*ROOT.glob("eebench/**/*.py"), *ROOT.glob("models/*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = (
        ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        if node.level
        else node.module
    )
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _internal(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(library modules imported at runtime, imports inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    top = {id(node) for node in tree.body}
    edges, local = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_only:
            continue
        names = _target(module, node)
        if id(node) not in top:
            local.append((node.lineno, names[0]))
        edges |= {target for name in names if (target := _internal(name)) and target != module}
    return edges, local


def test_no_import_cycle():
    graph = {module: _imports(module)[0] for module in MODULES}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target) :] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "eebench.cli"))
def test_imports_are_at_the_top(module):
    local = [(line, name) for line, name in _imports(module)[1] if name not in LAZY]
    assert not local, f"{MODULES[module]}: imports inside functions: {local}"
