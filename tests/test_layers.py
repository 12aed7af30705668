"""Imports run one way: a module imports only from its own layer or lower ones, and no two
packages import each other (a cycle is fixed by moving the shared piece down, not hidden behind
a lazy import).

Every import of `ttscale` in `src/ttscale` counts: top-level, inside functions, under
TYPE_CHECKING, and relative ones.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ttscale"

# The layer order, lowest first, written once. A layer is a package of src/ttscale or a
# top-level module; names in one tuple are one tier (they may import each other, without
# cycles). Layers that do not exist yet keep their place.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "threads", "strategy_spec"),
    ("tokenizer",),
    ("loader",),
    ("kvcache",),
    ("attention",),
    ("models",),
    ("cost",),
    ("sampling",),
    ("engine",),
    # `__init__` is ttscale/__init__.py: it re-exports the Python API (LLM and its outputs).
    ("llm", "__init__"),
    ("tasks",),
    ("tts",),
    # The probe verifier: trained from engine samples and task labels, applied by a scorer.
    ("verifier",),
    ("scorers",),
    ("strategies",),
    ("calibration",),
    ("eval",),
    ("plan",),
    # The dashboard's pages and eval-folder API; the server adds its live routes to them.
    ("ui",),
    ("server",),
    ("ray",),
    ("cli",),
)
RANK = {name: tier for tier, names in enumerate(LAYERS) for name in names}


@dataclass(frozen=True)
class Edge:
    path: Path  # the importing file
    line: int
    source: str  # its layer
    target: str  # the imported module's layer

    def __str__(self) -> str:
        where = self.path.relative_to(PACKAGE.parent)
        return f"{where}:{self.line}: {self.source} -> {self.target}"


def module_name(path: Path) -> str:
    """src/ttscale/a/b.py -> ttscale.a.b; src/ttscale/a/__init__.py -> ttscale.a."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of a dotted module under ttscale (the root package is `__init__`)."""
    parts = module.split(".")
    assert parts[0] == "ttscale", module
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, here: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import of a ttscale module in `source`, the text of
    module `here` (a package's __init__ when `is_package`)."""
    package = here if is_package else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ttscale" or alias.name.startswith("ttscale."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            if origin != "ttscale" and not origin.startswith("ttscale."):
                continue
            for alias in node.names:
                # `from ttscale import errors` imports a module; `from ttscale import LLM`
                # a name of the root package.
                sub = f"{origin}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else origin


def import_edges() -> list[Edge]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = layer_of(module_name(path))
        found = imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
        for line, module in found:
            edges.append(Edge(path, line, source, layer_of(module)))
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected groups of more than one layer (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_layer_is_in_the_order() -> None:
    layers = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    unknown = sorted(layers - RANK.keys())
    assert not unknown, f"packages/modules missing from LAYERS in {__file__}: {unknown}"


def test_imports_only_run_downward() -> None:
    upward = [e for e in import_edges() if e.target in RANK and RANK[e.target] > RANK[e.source]]
    order = " -> ".join(", ".join(names) for names in LAYERS)
    assert not upward, (
        f"{len(upward)} upward import(s) (layer order, lowest first: {order}):\n"
        + "\n".join(map(str, upward))
    )


def test_no_import_cycles_between_layers() -> None:
    edges = import_edges()
    found = cycles(edges)
    lines = []
    for group in found:
        inside = [e for e in edges if e.source in group and e.target in group]
        inside = [e for e in inside if e.source != e.target]
        lines.append(f"cycle {' <-> '.join(group)}:\n  " + "\n  ".join(map(str, inside)))
    assert not found, "\n".join(lines)


def test_the_checker_sees_every_kind_of_import() -> None:
    source = """
from __future__ import annotations
import json
from typing import TYPE_CHECKING
import ttscale.engine.sequence
from ttscale.tts.votes import majority_vote
from ttscale import LLM, errors
from . import base
from ..scorers import load_scorer
from .. import eval
if TYPE_CHECKING:
    from ttscale.plan.curves import PlanCandidate
def f():
    from ttscale.server.app import create_app
"""
    found = [
        (line, layer_of(m)) for line, m in imported_modules(source, "ttscale.strategies.x", False)
    ]
    assert found == [
        (5, "engine"),
        (6, "tts"),
        (7, "__init__"),
        (7, "errors"),
        (8, "strategies"),
        (9, "scorers"),
        (10, "eval"),
        (12, "plan"),
        (14, "server"),
    ]
    assert [e.target for e in import_edges() if e.path == PACKAGE / "__init__.py"].count("llm")


def test_cycles_are_found() -> None:
    e = [Edge(PACKAGE / "x.py", i, a, b) for i, (a, b) in enumerate(["ab", "bc", "ca", "da"])]
    assert cycles(e) == [["a", "b", "c"]]
    assert cycles(e[:2]) == []
