"""The package's layout by folder, each layer importing only from below, with no import cycles,
counting the imports made inside functions (a lazy import hides a cycle from Python, not from a reader):

    errors, files                          the bottom
    decay <- backends <- layers <- attention <- models   the model stack
    data, engine                           beside the model stack (models may take data's constants)
    tasks                                  on both
    tools                                  on tasks or models
    cli                                    on top
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import sdt

PACKAGE_ROOT = Path(sdt.__file__).parent
MISSING: Set[str] = set()  # imports of package modules that do not exist (a lazy import left behind by a move)


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
            MISSING.update(f"{name} -> {t}" for t in targets if t.startswith(root.name + ".") and t not in files)
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


def test_every_import_of_the_package_names_a_module_that_exists():
    MISSING.clear()
    import_graph()
    assert sorted(MISSING) == []


def test_sdt_has_no_import_cycles():
    graph = import_graph()
    assert "sdt.backends.fused_cpu" in graph["sdt.backends.ops"]  # the graph does see the package's imports
    assert cycles(graph) == []


LAYERS = {  # a layer -> the layers it may import (besides itself)
    "errors": set(),
    "files": {"errors"},
    "decay": {"errors"},
    "backends": {"errors", "decay"},
    "layers": {"errors", "decay", "backends"},
    "attention": {"errors", "decay", "backends", "layers"},
    "data": {"errors"},
    "models": {"errors", "files", "decay", "backends", "layers", "attention", "data"},
    "engine": {"errors", "files", "data"},
    "tasks": {"errors", "files", "decay", "backends", "layers", "attention", "data", "models", "engine"},
    "tools": {"errors", "files", "decay", "backends", "layers", "attention", "data", "models", "engine", "tasks"},
    "cli": {"errors", "files", "decay", "backends", "layers", "attention", "data", "models", "engine", "tasks",
            "tools"},
}


def layer(module: str) -> str:
    """``sdt.tasks.classify`` -> ``tasks``; the package itself is ``sdt`` (its face: it imports the model stack)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sdt"


def test_the_layers_import_downwards_only():
    """Every import of every module goes to its own layer or one below, by folder."""
    graph = import_graph()
    assert set(map(layer, graph)) == set(LAYERS) | {"sdt"}, "a new folder or top-level module needs its place in LAYERS"
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    if layer(name) != "sdt" and layer(target) != layer(name) and layer(target) not in LAYERS[layer(name)])
    assert upward == []


def test_models_take_only_constants_from_data():
    """Models are the library a user imports: of data they use Fashion-MNIST's statistics, nothing that reads files."""
    graph = import_graph()
    used = {target for name, targets in graph.items() if layer(name) == "models" for target in targets if layer(target) == "data"}
    assert used <= {"sdt.data.images"}


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: an engine module that imports a task is reported."""
    package = tmp_path / "sdt"
    for folder in ("engine", "tasks"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "tasks" / "classify.py").write_text("X = 1\n")
    (package / "engine" / "run.py").write_text("def f():\n    from ..tasks.classify import X\n")
    graph = import_graph(package)
    assert [t for t in graph["sdt.engine.run"] if layer(t) not in LAYERS["engine"] | {"engine"}] == ["sdt.tasks.classify"]


def test_every_folder_of_modules_is_a_package():
    """setuptools' find_packages ships only folders with an __init__.py: one without it would be left out of a wheel."""
    assert [str(p.relative_to(PACKAGE_ROOT)) for p in PACKAGE_ROOT.rglob("*.py") if not (p.parent / "__init__.py").is_file()] == []
