"""The import structure of ``src/asap``, checked from the source: no cycle, no upward import.

Every module is parsed with :mod:`ast` (nothing is imported), every import is
collected, at any nesting level (function-local, ``if TYPE_CHECKING:``, ``try:``
blocks), absolute or relative, and resolved to the ``asap`` module it names.
Each module belongs to the stage of its folder (``STAGES`` below); an import is
allowed only from a stage to the same stage or a lower one, and the module
graph must have no cycle.

Only explicit imports are edges: ``from asap.compile.swap import x`` is an edge
to ``asap.compile.swap``, not to the package ``asap.compile`` that Python
executes on the way (a package ``__init__`` importing its own submodules is not
a cycle in any sense that matters here).
"""

from __future__ import annotations

import ast
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# The allowed order, lowest first. A module may import modules of its own stage or of any stage with a lower rank;
# nothing may import upward. Prefixes are matched longest first; every module must match one (a new top-level module
# or folder fails the test until it is placed here).
#
# rank  stage         modules                                   may import (besides its own stage)
#    0  base          asap.errors, asap.io, asap.env,           nothing in asap
#                     asap.argtypes
#    1  transport     asap.transport.*                          base
#    2  attention     asap.attention.*                          transport, base
#    3  facade        asap (the root __init__: public API)      attention and below
#    4  models        asap.models.*                             facade and below
#    5  data          asap.data.*                               models and below
#    6  integrations  asap.integrations.*                       data and below
#    7  train         asap.train.*                              integrations and below
#    8  compile       asap.compile.*                            train and below
#    9  runs          asap.runs (saved runs and artifacts)      compile and below
#   10  bench         asap.bench.*                              runs and below
#   11  report        asap.report.*                             bench and below
#   12  cli           asap.cli.*, asap.__main__,                everything
#                     asap.compile.experiments (the old
#                     ``python -m`` name of the experiment
#                     driver asap.bench.compile_experiments,
#                     kept for the recorded commands),
#                     asap.bench.report (the ``python -m``
#                     name of the report asap.report, named
#                     by results/README.md and scripts/)
#
# The root ``asap/__init__.py`` re-exports the attention API (``asap.sinkhorn_attention``, ...), so it cannot sit at
# the bottom; it is the "facade" just above attention, and transport/attention/base may not import it.
# ---------------------------------------------------------------------------------------------------------------------
STAGES: dict[str, tuple[int, str]] = {
    "asap.errors": (0, "base"),
    "asap.io": (0, "base"),
    "asap.env": (0, "base"),
    "asap.argtypes": (0, "base"),
    "asap.transport": (1, "transport"),
    "asap.attention": (2, "attention"),
    "asap": (3, "facade"),  # exact match only: the root __init__
    "asap.models": (4, "models"),
    "asap.data": (5, "data"),
    "asap.integrations": (6, "integrations"),
    "asap.train": (7, "train"),
    "asap.compile": (8, "compile"),
    "asap.runs": (9, "runs"),
    "asap.bench": (10, "bench"),
    "asap.report": (11, "report"),
    "asap.cli": (12, "cli"),
    "asap.__main__": (12, "cli"),
    "asap.compile.experiments": (12, "cli"),  # a command-line alias, not part of the compile stage
    "asap.bench.report": (12, "cli"),  # a command-line alias, not part of the bench stage
}

# Violations present today (issue 9, item 2), written as ``"upward: A -> B"`` and ``"cycle: A <-> B [<-> ...]"``.
# The test fails if a violation appears that is not listed here, AND if a listed one no longer exists: when a fix
# lands, remove its line in the same commit (the list only shrinks; the refactor empties it).
KNOWN_VIOLATIONS: frozenset[str] = frozenset()

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "asap"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> tuple[int, str]:
    if module == "asap":
        return STAGES["asap"]
    for prefix in sorted((p for p in STAGES if p != "asap"), key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return STAGES[prefix]
    raise KeyError(module)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of ours (``asap.x.y.func`` -> ``asap.x.y``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ``asap`` module that ``module`` imports, at any nesting level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up level - 1 more
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else a name of ``pkg``.
            names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules) if name == "asap" or name.startswith("asap.") else None
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module are the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def violations(graph: dict[str, set[str]]) -> set[str]:
    found = set()
    for component in strongly_connected_components(graph):
        if len(component) > 1:
            found.add("cycle: " + " <-> ".join(component))
    for source, targets in graph.items():
        rank = stage_of(source)[0]
        for target in targets:
            if stage_of(target)[0] > rank:
                found.add(f"upward: {source} -> {target}")
    return found


# --------------------------------------------------------------------------------------------------------- the tests


def test_every_module_has_a_stage():
    unplaced = sorted(name for name in all_modules() if _safe_stage(name) is None)
    assert not unplaced, f"modules with no stage in STAGES (place them in the table): {unplaced}"


def _safe_stage(name: str):
    try:
        return stage_of(name)
    except KeyError:
        return None


def test_no_new_cycle_or_upward_import():
    graph = import_graph()
    new = sorted(violations(graph) - KNOWN_VIOLATIONS)
    assert not new, "new import-structure violations (see the STAGES table):\n" + "\n".join(new)


def test_known_violations_still_exist():
    """A fixed violation fails here until its line is removed from KNOWN_VIOLATIONS, so the list only shrinks."""
    fixed = sorted(KNOWN_VIOLATIONS - violations(import_graph()))
    assert not fixed, "these known violations are gone; delete them from KNOWN_VIOLATIONS:\n" + "\n".join(fixed)


# ----------------------------------------------------------------------------------- the checker checks itself


def test_graph_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    """The parser finds imports inside functions, ``from pkg import submodule`` and relative imports."""
    pkg = tmp_path / "asap"
    (pkg / "transport").mkdir(parents=True)
    (pkg / "compile").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "transport" / "__init__.py").write_text("")
    (pkg / "transport" / "masks.py").write_text("def f():\n    from asap.compile.swap import x\n")
    (pkg / "compile" / "__init__.py").write_text("from . import swap\n")
    (pkg / "compile" / "swap.py").write_text("from ..transport import masks\nimport asap.errors\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["asap.transport.masks"] == {"asap.compile.swap"}
    assert graph["asap.compile.swap"] == {"asap.transport.masks", "asap.errors"}
    assert graph["asap.compile"] == {"asap.compile.swap"}
    assert violations(graph) == {
        "cycle: asap.compile.swap <-> asap.transport.masks",
        "upward: asap.transport.masks -> asap.compile.swap",
    }


def test_tarjan_finds_every_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d", "a"}, "e": {"f"}, "f": set()}
    components = {tuple(c) for c in strongly_connected_components(graph)}
    assert ("a", "b", "c") in components
    assert ("e",) in components and ("f",) in components
