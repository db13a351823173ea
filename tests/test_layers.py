"""The package's layers are its folders, and imports only run down them (../shared/STYLE.md, DESIGN.md).

Read from the source with `ast`: every import counts, at module level or inside a function, under
TYPE_CHECKING or not, because each one is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tunneld"
# Top first. A module may import from its own layer and any layer below; the shared modules from nowhere else.
LAYERS = ("cli", "api", "runtime", "engines", "autostart", "config", "state", "shared")
SHARED = {"tunneld.errors", "tunneld.states", "tunneld.safetext"}
MODULE_MAX_LINES = 400
CLASS_MAX_LINES = 250


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(top: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / top).rglob("*.py"))}


ALL = {**modules("tunneld"), **modules("bench")}


def layer_of(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module in ("tunneld", "tunneld.api"):
        return "api"  # the package's lazy face: `tunneld.ensure` is api.ensure
    if module == "tunneld.__main__":
        return "cli"
    return module.split(".")[1]


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """Yield (imported module, line) for every import of `module`; `from X import Y` names X.Y when that is a module."""
    path = ALL[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield (f"{base}.{alias.name}" if f"{base}.{alias.name}" in ALL else base), node.lineno


def own_imports(module: str) -> set[str]:
    return {name for name, _ in imports_of(module) if name in ALL and name != module}


def test_every_module_sits_in_a_known_layer() -> None:
    unknown = [name for name in modules("tunneld") if layer_of(name) not in LAYERS]
    assert unknown == []


@pytest.mark.parametrize("module", sorted(modules("tunneld")))
def test_imports_run_only_down_the_layers(module: str) -> None:
    rank = LAYERS.index(layer_of(module))
    upward = [
        f"line {line}: {name} ({layer_of(name)})"
        for name, line in imports_of(module)
        if (name == "tunneld" or name.startswith("tunneld.")) and name in ALL  # `from tunneld import X` is the api
        and (LAYERS.index(layer_of(name)) < rank or (layer_of(module) == "shared" and layer_of(name) != "shared"))
    ]  # fmt: skip
    assert upward == [], f"{module} ({layer_of(module)}) imports upward"


def test_no_module_imports_itself_back_through_others() -> None:
    graph = {name: own_imports(name) for name in ALL}
    cycles = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert cycles == []


def test_no_module_imports_by_a_name_computed_at_run_time() -> None:
    """importlib.import_module and __import__ would hide a dependency from the rules above (and from a reader)."""
    dynamic = [
        f"{module}:{node.lineno}"
        for module in ALL
        for node in ast.walk(ast.parse(ALL[module].read_text()))
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
            or (isinstance(node.func, ast.Attribute) and node.func.attr in ("__import__", "import_module"))
        )
    ]
    assert dynamic == []


def test_a_layer_that_imports_a_paramiko_or_click_name_is_the_one_that_owns_it() -> None:
    """Nothing above engines/ imports paramiko; nothing below cli/ imports click (DESIGN.md)."""
    wrong = []
    for module in modules("tunneld"):
        for name, line in imports_of(module):
            if name.split(".")[0] == "paramiko" and layer_of(module) != "engines":
                wrong.append(f"{module}:{line} imports {name}")
            if name.split(".")[0] == "click" and layer_of(module) != "cli":
                wrong.append(f"{module}:{line} imports {name}")
    assert wrong == []


@pytest.mark.parametrize("module", sorted(modules("tunneld")))
def test_each_module_and_class_can_be_read_in_one_sitting(module: str) -> None:
    path = ALL[module]
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MODULE_MAX_LINES, f"{module} has {lines} lines: split it by concern"
    long_classes = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.end_lineno and node.end_lineno - node.lineno + 1 > CLASS_MAX_LINES
    ]
    assert long_classes == []


def test_the_checker_sees_function_level_imports_and_cycles() -> None:
    """The rules above would pass vacuously if the walk missed imports inside functions or the search missed cycles."""
    found = {name for name, _ in imports_of("tunneld.runtime.detached")}
    assert "tunneld.runtime.daemon" in found  # imported inside main()
    assert ("tunneld", 9) in set(imports_of("tunneld.cli.main"))  # `from tunneld import __version__`: the api layer
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}, {"d"}]
    assert layer_of("tunneld.cli.main") == "cli" and layer_of("tunneld.state.paths") == "state"


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively: the graph's strongly connected components, in the order they complete."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next((e for e in edges if e in graph), None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
    return found
