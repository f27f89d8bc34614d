"""The package's shape: stages import only stages below them, and no import hides a cycle.

Read from the source with ast (function-level imports included), so a cycle that only shows
when some command runs is caught here and not by a user.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import bundler

ROOT = Path(bundler.__file__).resolve().parent

# Lower to higher. A module may import its own layer and the layers before it.
LAYERS = [
    {"bundler.errors", "bundler.proc", "bundler.progress", "bundler.cache"},
    {"bundler.config"},
    {"bundler.build"},
    {"bundler.compile"},
    {"bundler.package"},
    {"bundler.device", "bundler.client"},
    {"bundler.api"},
    {"bundler.commands"},
    {"bundler.cli", "bundler.__main__", "bundler"},
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layout.py")


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported bundler module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("bundler"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module or ""
                if mod.startswith("bundler"):
                    # `from bundler.x import y` may name a module y: count the deeper one.
                    for a in child.names:
                        sub = f"{mod}.{a.name}"
                        found.append((sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists()
                                      or (ROOT.parent / sub.replace(".", "/")).is_dir() else mod,
                                      child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


ALL = modules()


@pytest.mark.parametrize("name, path", ALL, ids=[n for n, _ in ALL])
def test_lower_layers_never_import_higher_ones(name, path):
    mine = layer_of(name)
    for target, line, _ in imports(name, path):
        if target == "bundler" and name.startswith("bundler."):
            continue          # `from bundler import __version__`: the package's own metadata
        assert layer_of(target) <= mine, (f"{path.relative_to(ROOT.parent)}:{line}: {name} (layer {mine}) imports "
                                         f"{target} (layer {layer_of(target)}): lower layers never import higher ones")


def test_no_import_inside_a_function_hides_a_cycle():
    """A function-level import of a bundler module is allowed only where the module at top level
    would be a cycle-free import too: i.e. it is there to defer a heavy dependency, not a cycle."""
    graph: dict[str, set[str]] = {name: {t for t, _, _ in imports(name, path)} for name, path in ALL}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m in seen:
                continue
            seen.add(m)
            todo += [t for t in graph.get(m, ()) if t != "bundler"]
        return False

    for name, path in ALL:
        for target, line, in_function in imports(name, path):
            if in_function and target != "bundler":
                assert not reaches(target, name), (f"{path.relative_to(ROOT.parent)}:{line}: importing {target} "
                                                   f"inside a function hides a cycle back to {name}")


def test_every_module_imports_on_its_own():
    for m in pkgutil.walk_packages(bundler.__path__, "bundler."):
        if m.name.endswith("__main__"):
            continue
        importlib.import_module(m.name)
