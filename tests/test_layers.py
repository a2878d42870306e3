"""The package's layers import downwards only, and no modules import each other in a circle.

Layers, lowest first (docs/design.md, "Layers"): the foundation modules, ``format``,
``storage``, ``dist``, ``plan``, ``io``, ``migrate``, ``engine``, ``session``,
``interchange``, ``compat``, ``cli``, ``reference``. A module may import its own layer and
the layers below it; the package root (``distckpt/__init__.py``) only re-exports and is
imported by nothing inside the package. Imports under ``if TYPE_CHECKING:`` count for the
direction of layers but not for circles (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import distckpt

PACKAGE = Path(distckpt.__file__).resolve().parent
LAYERS = [
    {"errors", "logs", "faults"},
    {"format"},
    {"storage"},
    {"dist"},
    {"plan"},
    {"io"},
    {"migrate"},
    {"engine"},
    {"session"},
    {"interchange"},
    {"compat"},
    {"cli"},
    {"reference"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported module, runs at run time) for every import of distckpt code."""
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.split(".")[0] == "distckpt" and target != name:
                    found.append((name, target, id(node) not in typing_only))
    return found


def _level(module: str) -> int | None:
    parts = module.split(".")
    return LEVEL[parts[1]] if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer():
    unknown = {m for m in _modules() if m != "distckpt" and m.split(".")[1] not in LEVEL}
    assert not unknown, f"modules outside every layer: {sorted(unknown)}"


def test_imports_point_down_the_layers():
    wrong = []
    for importer, target, _ in _imports(_modules()):
        if target == "distckpt":
            wrong.append(f"{importer} imports the package root")
            continue
        low, high = _level(target), _level(importer)
        if low is not None and high is not None and low > high:
            wrong.append(f"{importer} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, target, runtime in _imports(modules):
        if runtime and target in modules and importer != "distckpt":
            graph[importer].add(target)
    cycles = _cycles(graph)
    assert not cycles, f"import circles: {cycles}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_checks_see_a_circle_and_an_upward_import():
    """The checker itself: a made-up graph with a circle, and the real level table."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _level("distckpt.format.tree") < _level("distckpt.engine.api")  # type: ignore[operator]
