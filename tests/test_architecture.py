"""The package's import structure, as ``docs/architecture.md`` draws it: no import cycles among
the shipped modules, counting imports inside functions and the modules the registry imports by
name, and the layers import downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ano_optimizer.registry.builtins import BUILTIN_SPECS
from ano_optimizer.registry.spec import FRAMEWORKS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    "ano_optimizer": ROOT / "ano_optimizer",
    "ano_optimizer.integrations": ROOT / "integrations",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "ano_optimizer" and name.startswith("ano_optimizer.integrations"):
                continue
            found[name] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, level: int, importer: str) -> str:
    if level == 0:
        return module
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _target(name: str) -> str | None:
    """The shipped module that importing ``name`` runs last (the name itself or its nearest
    shipped parent), or None outside this project."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str) -> set[str]:
    """Every shipped module ``name`` imports, at the top or inside a function."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    edges: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            edges.update(filter(None, (_target(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node.module or "", node.level, name)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                edges.add(_target(submodule if submodule in MODULES else source))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            edges.add(_target(node.args[0].value))
    edges.discard(None)
    edges.discard(name)
    return edges


def _graph() -> dict[str, set[str]]:
    graph = {name: _imports(name) for name in MODULES}
    # The registry imports the built-ins' classes by their "module:Class" references.
    for spec in BUILTIN_SPECS:
        for reference in filter(None, map(spec.class_reference, FRAMEWORKS)):
            graph["ano_optimizer.registry"].add(_target(reference.partition(":")[0]))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_the_known_edges():
    graph = _graph()
    assert "ano_optimizer.fused.native" in graph["ano_optimizer.fused"]
    assert "ano_optimizer.fused.torch_step" in graph["ano_optimizer.fused.op"]
    assert "ano_optimizer.blockwise8" in graph["ano_optimizer.fused.torch_step"]
    assert "ano_optimizer.registry.spec" in graph["ano_optimizer.registry.plugins"]
    assert "ano_optimizer.param_groups" in graph["ano_optimizer.registry"]  # inside a function
    assert "ano_optimizer.keras.optimizers" in graph["ano_optimizer.registry"]  # by reference
    assert "ano_optimizer.integrations.keras" in graph["ano_optimizer.keras"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# Modules below import nothing of the project's above them (the layers of docs/architecture.md).
LEAVES = [
    "ano_optimizer.hyperparameters",
    "ano_optimizer.rounding",
    "ano_optimizer._torch_internals",
    "ano_optimizer.registry.spec",
]


@pytest.mark.parametrize("name", LEAVES)
def test_leaf_modules_import_no_other_module_of_the_project(name):
    assert _graph()[name] == set()


def test_the_execution_paths_never_import_the_registry_or_the_frameworks():
    graph = _graph()
    paths = [name for name in graph if name.startswith("ano_optimizer.fused")]
    paths += ["ano_optimizer.optimizer", "ano_optimizer.step_scalars", "ano_optimizer.saved_state"]
    for name in paths:
        outward = {
            other
            for other in graph[name]
            if other.startswith(("ano_optimizer.registry", "ano_optimizer.integrations"))
            or other.startswith("ano_optimizer.keras")
        }
        assert not outward, (name, outward)


def _private_uses(name: str) -> list[str]:
    """The underscore names ``name`` takes from other modules of the project: imported, or read
    as an attribute of a project module it imported."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    modules_bound: dict[str, str] = {}  # local name -> project module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _target(alias.name) == alias.name:
                    modules_bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node.module or "", node.level, name)
            if _target(source) is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    modules_bound[alias.asname or alias.name] = submodule
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {source} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules_bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and modules_bound[node.value.id] != name
        ):
            found.append(f"{modules_bound[node.value.id]}.{node.attr}")
    return found


def test_modules_talk_through_public_names():
    """A helper another module needs gets a public name in the module that owns it."""
    used = {name: _private_uses(name) for name in MODULES}
    assert {name: found for name, found in used.items() if found} == {}


def test_the_private_name_finder_finds_one(tmp_path, monkeypatch):
    path = tmp_path / "user.py"
    path.write_text(
        "from ano_optimizer.fused import torch_step\n"
        "from ano_optimizer.tensor_checks import _freed\n"
        "torch_step._sizes\n"
    )
    monkeypatch.setitem(MODULES, "ano_optimizer.user", path)
    found = _private_uses("ano_optimizer.user")
    assert found == [
        "from ano_optimizer.tensor_checks import _freed",
        "ano_optimizer.fused.torch_step._sizes",
    ]
