"""The package is layered: no import cycle between subpackages or between modules, and every
subpackage imports on its own in a fresh interpreter.

The import graph is read from the source with ``ast`` (relative imports resolved, imports inside
functions and ``if TYPE_CHECKING:`` blocks included), so a cycle hidden in a function-level import
is found as well as one at module level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "lipdeq"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(src: Path = SRC) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted((src / ROOT).rglob("*.py"))}


def _is_package(name: str, modules: Mapping[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(name: str, tree: ast.AST, modules: Mapping[str, Path]) -> set[str]:
    """The lipdeq modules that executing module ``name`` can import (anywhere in its body).

    ``from X import Y`` imports X.Y when that is a module, else X. Importing a module runs its
    ancestor packages too; those that are also ancestors of ``name`` are already initialised (or
    initialising) when ``name`` runs, so only the others count as edges.
    """
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    own_ancestors = set(_ancestors(name))
    edges: set[str] = set()
    for target in targets:
        if target not in modules:
            continue  # not lipdeq (or a name that is not a module)
        for ancestor in [*_ancestors(target), target]:
            if ancestor in modules and ancestor not in own_ancestors and ancestor != name:
                edges.add(ancestor)
    return edges


def module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module name -> the lipdeq modules it imports."""
    modules = _modules(src)
    return {
        name: _imported(name, ast.parse(path.read_text(encoding="utf-8"), str(path)), modules)
        for name, path in modules.items()
    }


def _unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: lipdeq.models.mdeq -> lipdeq.models."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """Edges between subpackages (and top-level modules), ignoring imports within one of them."""
    out: dict[str, set[str]] = {_unit(m): set() for m in graph if m != ROOT}
    for module, targets in graph.items():
        if module == ROOT:
            continue
        for target in targets:
            if target != ROOT and _unit(target) != _unit(module):
                out[_unit(module)].add(_unit(target))
    return out


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (or a self-loop), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
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
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_graph_finds_cycles_hidden_in_functions_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: the configs <-> models shape of cycle (one side imported inside a function,
    one relative) is found at both levels, and an acyclic tree passes."""
    cyclic = _write_tree(
        tmp_path / "cyclic",
        {
            "__init__.py": "",
            "configs/__init__.py": "from lipdeq.configs.schema import RunConfig\n",
            "configs/schema.py": "from lipdeq.models.config import ModelConfig\nRunConfig = 1\n",
            "models/__init__.py": "from .registry import create_model\n",
            "models/config.py": "ModelConfig = 1\n",
            "models/registry.py": "def create_model():\n    from ..configs import schema\n",
        },
    )
    graph = module_graph(cyclic)
    assert graph["lipdeq.models.registry"] == {"lipdeq.configs", "lipdeq.configs.schema"}
    assert "lipdeq.models" in graph["lipdeq.configs.schema"]  # importing models.config runs models/__init__
    assert find_cycles(package_graph(graph)) == [["lipdeq.configs", "lipdeq.models"]]
    assert find_cycles(graph)  # and the modules form a cycle too
    acyclic = _write_tree(
        tmp_path / "acyclic",
        {
            "__init__.py": "",
            "presets/__init__.py": "",
            "models/__init__.py": "from .registry import create_model\n",
            "models/config.py": "ModelConfig = 1\n",
            "models/registry.py": "from lipdeq.presets import x\nfrom .config import ModelConfig\n",
            "configs/__init__.py": "from .schema import RunConfig\n",
            "configs/schema.py": "from lipdeq.models.config import ModelConfig\n",
        },
    )
    assert find_cycles(package_graph(module_graph(acyclic))) == []
    assert find_cycles(module_graph(acyclic)) == []


def test_no_import_cycle_between_subpackages() -> None:
    packages = package_graph(module_graph())
    assert {"lipdeq.configs", "lipdeq.models", "lipdeq.training"} <= set(packages)
    assert find_cycles(packages) == []


def test_no_import_cycle_between_modules() -> None:
    assert find_cycles(module_graph()) == []


SUBPACKAGES = sorted(m for m, p in _modules().items() if p.name == "__init__.py" and m != ROOT)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_imports_alone_in_a_fresh_interpreter(package: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {package}"], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
