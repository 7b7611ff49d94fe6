"""Imports inside asyncwatch point one way, down the layers, with no cycle.

Every ``import`` statement counts: module level, inside functions, and under
``if TYPE_CHECKING:`` (a cycle hidden in a function is still a cycle).  The
layers, lowest first (CONTRIBUTING.md draws them):

0. ``_version`` and ``_core``: findings, frames, runtime, settings, the
   detector interface, tasks; the standard library and structlog only;
1. ``_detectors`` (one module per kind) and ``_outputs`` (pipeline, log,
   JSON Lines, OpenTelemetry), which never import each other;
2. ``_patches`` and ``_engine`` (orchestration);
3. ``_policy`` (the loop factory and the policy attach loops);
4. ``_install`` (install/uninstall);
5. front ends: the command line, its children and signals, the pytest
   plugin, the public ``testing`` and ``instrumentation`` modules;
6. the package itself and its entry scripts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import asyncwatch

PACKAGE_DIR = Path(asyncwatch.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("asyncwatch._version", "asyncwatch._core"),
    ("asyncwatch._detectors", "asyncwatch._outputs"),
    ("asyncwatch._patches", "asyncwatch._engine"),
    ("asyncwatch._policy",),
    ("asyncwatch._install",),
    (
        "asyncwatch._cli",
        "asyncwatch._children",
        "asyncwatch._signals",
        "asyncwatch._pytest_support",
        "asyncwatch.pytest_plugin",
        "asyncwatch.testing",
        "asyncwatch.instrumentation",
    ),
    ("asyncwatch", "asyncwatch.__main__", "asyncwatch._bootstrap"),
]

#: What the core may import besides itself.
CORE_THIRD_PARTY = {"structlog"}


def module_name(path: Path) -> str:
    parts = ["asyncwatch", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every module *name* imports anywhere in its source, resolved to full names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules  # `from . import _children` imports a module...
            if len(submodules) < len(node.names):
                found.add(target)  # ...and `from .x import y` imports x
    return found


def own_imports(name: str) -> set[str]:
    return {i for i in imports_of(name) if i in MODULES and i != name}


def layer_of(name: str) -> int:
    best: tuple[int, int] | None = None  # (length of the matching prefix, layer)
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and CONTRIBUTING.md)"
    return best[1]


def test_every_module_is_in_a_layer() -> None:
    assert len(MODULES) > 20
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    """A module imports only from its own layer or below."""
    upward = sorted(i for i in own_imports(name) if layer_of(i) > layer_of(name))
    assert upward == [], f"{name} (layer {layer_of(name)}) imports from higher layers: {upward}"


def test_detectors_and_outputs_do_not_import_each_other() -> None:
    """Findings flow one way: detectors -> pipeline -> outputs, never back."""
    crossing = [
        (name, i)
        for name in MODULES
        for i in own_imports(name)
        if (name.startswith("asyncwatch._detectors") and i.startswith("asyncwatch._outputs"))
        or (name.startswith("asyncwatch._outputs") and i.startswith("asyncwatch._detectors"))
    ]
    assert crossing == []


def test_the_core_needs_only_the_standard_library_and_structlog() -> None:
    outside = sorted(
        (name, i)
        for name in MODULES
        if name.startswith("asyncwatch._core")
        for i in imports_of(name)
        if not i.startswith("asyncwatch")
        and i.partition(".")[0] not in sys.stdlib_module_names
        and i.partition(".")[0] not in CORE_THIRD_PARTY
        and i != "__future__"
    )
    assert outside == []
    upward = sorted(
        (name, i)
        for name in MODULES
        if name.startswith("asyncwatch._core")
        for i in own_imports(name)
        if not (i.startswith("asyncwatch._core") or i == "asyncwatch._version")
    )
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    """Not even through a function-level or TYPE_CHECKING import."""
    graph = {name: own_imports(name) for name in MODULES}
    # A package's __init__ runs before its modules, but importing a module
    # does not import the modules its package's __init__ imports: the edges
    # are the import statements themselves.
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_the_walk_sees_imports_inside_functions_and_type_checking() -> None:
    """The checker itself: a hidden import counts."""
    assert "asyncwatch._outputs.otel.telemetry" in imports_of("asyncwatch._engine")  # inside Engine.__init__
    assert "asyncwatch._core.settings" in imports_of("asyncwatch._core.detector")  # under TYPE_CHECKING
