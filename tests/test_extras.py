"""The core install (`pip install ttscale`) runs `generate` / `chat` without the server, eval
and plotting stacks; a command that needs one names the extra to install.

Each check runs in a fresh interpreter in which the optional packages cannot be imported
(`sys.modules[name] = None`: `import` raises ModuleNotFoundError and `find_spec` answers None,
as when the package is not installed), since this process has them all loaded already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ttscale.cli import EXTRA_OF

ROOT = Path(__file__).resolve().parents[1]
# pydantic belongs to [server] too, but typer depends on it: the core always has it.
OPTIONAL = ("fastapi", "starlette", "uvicorn", "prometheus_client", "matplotlib", "reasoning_gym")

BLOCK = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
"""


def run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_core_cli_runs_without_optional_stacks() -> None:
    code = """
from typer.testing import CliRunner
from ttscale.cli import app

result = CliRunner().invoke(app, ["generate", "--help"])
assert result.exit_code == 0, result.output
assert "--max-tokens" in result.output
listing = CliRunner().invoke(app, ["--help"])
assert listing.exit_code == 0, listing.output
for command in ("generate", "chat", "serve", "eval", "plan", "solve"):
    assert command in listing.output, command
loaded = [m for m in sys.modules if m.partition(".")[0] in OPTIONAL and sys.modules[m]]
assert not loaded, loaded
print("ok")
"""
    proc = run_without_extras(f"OPTIONAL = {OPTIONAL!r}\n{code}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_missing_extra_names_the_install() -> None:
    code = """
from ttscale.cli import app
app(["serve"])
"""
    proc = run_without_extras(code)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'ttscale[server]'" in " ".join(proc.stderr.split())

    code = """
from ttscale.cli import app
app(["eval", "--task", "arithmetic", "--strategies", "greedy"])
"""
    proc = run_without_extras(code)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'ttscale[eval]'" in " ".join(proc.stderr.split())


def test_extras_match_pyproject() -> None:
    """Every package the CLI calls optional is in its extra and not in the core install."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in requirements:
            name = req.split(";")[0].split("[")[0]
            for sep in "<>=!~ ":
                name = name.split(sep)[0]
            out.add(name.strip().lower().replace("-", "_"))
        return out

    core = names(project["dependencies"])
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert project["optional-dependencies"]["all"] == ["ttscale[server,eval]"]
    extras["all"] = extras["server"] | extras["eval"]
    assert set(EXTRA_OF) >= set(OPTIONAL)
    for module, extra in EXTRA_OF.items():
        assert module not in core, module
        if module != "starlette":  # comes with fastapi
            assert module in extras[extra], (module, extra)
            assert module in extras["all"], module
