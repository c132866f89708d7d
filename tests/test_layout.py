"""The package's layout: decay -> backends -> attention -> models, config/data -> engine -> tasks -> cli,
with no import cycles, counting the imports made inside functions (a lazy import hides a cycle from
Python, not from a reader)."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import sdt

PACKAGE_ROOT = Path(sdt.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE_ROOT) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: Dict[str, Set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = ".".join(base[:len(base) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from pkg import submodule` names a module; `from module import name` names the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_lazy_import(tmp_path):
    """The check itself: two modules that import each other, one of them inside a function."""
    package = tmp_path / "sdt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from .a import f\n")
    graph = import_graph(package)
    assert graph["sdt.b"] == {"sdt.a"} and graph["sdt.c"] == {"sdt.a"}
    assert cycles(graph) == [["sdt.a", "sdt.b"]]


def test_sdt_has_no_import_cycles():
    graph = import_graph()
    assert "sdt.backends.fused_cpu" in graph["sdt.backends.ops"]  # the graph does see the package's imports
    assert cycles(graph) == []


def test_the_layers_import_downwards_only():
    """The pure decay math and the attention layer know nothing of training; the engine knows no task."""
    graph = import_graph()

    def reaches(start: str) -> Set[str]:
        seen, todo = set(), [start]
        while todo:
            for succ in graph[todo.pop()] - seen:
                seen.add(succ)
                todo.append(succ)
        return seen

    tasks = {"sdt.train", "sdt.generate", "sdt.dense_tasks", "sdt.cli", "sdt.hub", "sdt.fid"}
    assert not reaches("sdt.decay") & {"sdt.backends", "sdt.attention", "sdt.engine"}
    assert not reaches("sdt.attention") & ({"sdt.engine", "sdt.data", "sdt.config"} | tasks)
    assert not reaches("sdt.engine") & tasks
