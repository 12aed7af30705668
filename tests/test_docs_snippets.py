"""Every Python snippet of README.md and docs/*.md: it compiles and names nothing it does not
define or import (the check that catches a snippet's NameError without running it), and it runs
unless the line before its fence says why it cannot here:

    <!-- docs-test: skip (needs a running server) -->

A snippet that goes on from the one before it in the same file says so (`continues`), and is
checked and run after it: `<!-- docs-test: continues; skip (needs a running server) -->`.
A skipped snippet is still checked statically. Runnable snippets run in a fresh interpreter
from a temporary folder, so they cannot lean on this test's imports or the repository's files.
"""

from __future__ import annotations

import builtins
import re
import subprocess
import symtable
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
MARKER = re.compile(r"<!--\s*docs-test:(?P<body>.*)-->")
SKIP = re.compile(r"skip\s*\((?P<reason>[^)]*)\)")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str  # with the snippets it continues, if any
    skip: str | None  # the reason, when it cannot run here

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            marker = MARKER.search(lines[start - 1]) if start else None
            options = marker.group("body") if marker else ""
            skip = SKIP.search(options)
            code = "\n".join(body) + "\n"
            if "continues" in options:
                if not out:
                    raise ValueError(f"{path}:{start + 1}: continues no snippet")
                code = out[-1].code + code
            out.append(Snippet(path, start + 1, code, skip.group("reason") if skip else None))
        i += 1
    return out


ALL = [s for path in DOCS for s in snippets(path)]


def undefined_names(code: str) -> set[str]:
    """Global names the code reads but neither binds nor imports (nor are builtins), in any
    scope: what would raise NameError when it runs."""
    top = symtable.symtable(code, "<snippet>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = bound | set(dir(builtins))
    missing: set[str] = set()

    def visit(table: symtable.SymbolTable) -> None:
        for sym in table.get_symbols():
            is_global = table is top or sym.is_global()
            if sym.is_referenced() and is_global and sym.get_name() not in known:
                missing.add(sym.get_name())
        for child in table.get_children():
            visit(child)

    visit(top)
    return missing


def test_docs_have_python_snippets() -> None:
    # The check below would pass vacuously if the fence syntax changed under it.
    assert len(ALL) >= 4 and any(s.path.name == "PLANNER.md" for s in ALL)


@pytest.mark.parametrize("snippet", ALL, ids=lambda s: s.name)
def test_snippet_names_are_defined(snippet: Snippet) -> None:
    compile(snippet.code, snippet.name, "exec")
    assert not undefined_names(snippet.code), f"{snippet.name} uses undefined names"


def test_undefined_names_finds_the_planner_bug() -> None:
    """The old docs/PLANNER.md snippet used `llm` and `task` without making them."""
    old = "from ttscale.plan import pilot\np = pilot(llm, task, n_problems=12)\n"
    assert undefined_names(old) == {"llm", "task"}
    assert undefined_names("xs = [y for y in range(3)]\ndef f():\n    return xs, z\n") == {"z"}


@pytest.mark.parametrize("snippet", ALL, ids=lambda s: s.name)
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    if snippet.skip is not None:
        pytest.skip(snippet.skip)
    proc = subprocess.run(
        [sys.executable, "-c", snippet.code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{snippet.name}:\n{proc.stderr[-2000:]}"
