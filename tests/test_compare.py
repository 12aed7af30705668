"""`ttscale compare`: the paired statistics on synthetic records (exact values where they
exist), and the command on two synthetic eval folders (no model)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ttscale.cli import app
from ttscale.eval.compare import (
    compare_runs,
    compare_strategy,
    mcnemar_exact,
    paired_bootstrap_ci,
    settings_diff,
)
from ttscale.eval.compare_cli import compare_table


def records(strategy: str, correct: list[bool], seconds: float = 1.0, **cost) -> list[dict]:
    return [
        {
            "strategy": strategy,
            "problem_id": f"p{i}",
            "correct": c,
            "amortized_time": seconds,
            **cost,
        }
        for i, c in enumerate(correct)
    ]


def test_mcnemar_exact_values() -> None:
    # Two-sided exact: 2 * P(X <= min) for X ~ Binomial(n, 1/2), capped at 1.
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(5, 0) == mcnemar_exact(0, 5)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(3, 3) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_is_seeded_and_brackets_the_difference() -> None:
    a = [True, False, True, False, False, True, False, False] * 4
    b = [True, True, True, False, True, True, False, True] * 4
    lo, hi = paired_bootstrap_ci(a, b)
    diff = (sum(b) - sum(a)) / len(a)
    assert lo < diff < hi and lo > 0  # B never loses a problem: the whole interval is > 0
    assert (lo, hi) == paired_bootstrap_ci(a, b)  # seeded
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)  # identical outcomes: no spread
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:-1])


def test_compare_on_shared_problems_only() -> None:
    a = records("greedy", [True, False, False, True], seconds=1.0, flops=10.0)
    b = records("greedy", [True, True, True, True, False], seconds=4.0, flops=30.0)
    c = compare_strategy(a, b, "greedy")
    assert c.n == 4 and c.only_in_a == 0 and c.only_in_b == 1  # p4 is B's alone
    assert (c.accuracy_a, c.accuracy_b, c.diff) == (0.5, 1.0, 0.5)
    assert (c.a_only, c.b_only) == (0, 2)
    assert c.p_value == pytest.approx(mcnemar_exact(0, 2))
    assert c.cost_ratios["seconds"] == pytest.approx(4.0)
    assert c.cost_ratios["flops"] == pytest.approx(3.0)
    assert c.cost_ratios["bytes"] is None  # neither run has it
    json.dumps(c.to_dict())


def test_compare_runs_strategies() -> None:
    a = records("greedy", [True, False]) + records("majority@4", [True, True])
    b = records("majority@4", [False, True]) + records("bon@4", [True, True])
    rows = compare_runs(a, b)
    assert [r.strategy for r in rows] == ["majority@4"]
    with pytest.raises(ValueError, match="not in both runs"):
        compare_runs(a, b, ["greedy"])
    with pytest.raises(ValueError, match="share no strategy"):
        compare_runs(records("greedy", [True]), records("bon@4", [True]))


def test_settings_diff() -> None:
    a = {"model": "a.gguf", "params": {"temperature": 0.7, "seed": 0}}
    b = {"model": "b.gguf", "params": {"temperature": 0.7, "seed": 1}}
    assert settings_diff(a, b) == ["model: 'a.gguf' -> 'b.gguf'", "params.seed: 0 -> 1"]
    assert settings_diff(a, a) == []


def test_compare_table_fits_100_columns() -> None:
    a = records("weighted@16:t=0.7,p=0.95", [True, False] * 10, flops=1e12, bytes=1e11)
    b = records("weighted@16:t=0.7,p=0.95", [True, True] * 10, seconds=13.7, flops=3e12,
                bytes=5e11)  # fmt: skip
    rows = compare_runs(a, b)
    out = io.StringIO()
    Console(file=out, width=100).print(compare_table(rows))
    text = out.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 100
    assert "weighted@16:t=0.7,p=0.95" in text and "13.70x" in text


def write_run(folder: Path, settings: dict, recs: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"settings": settings}))
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


def test_compare_command(tmp_path: Path) -> None:
    correct_a = [True, False, False, True, False, False, True, False] * 2
    correct_b = [True, True, True, True, False, True, True, True] * 2
    run_a = write_run(
        tmp_path / "A",
        {"model": "a.gguf"},
        records("greedy", correct_a) + records("majority@4", correct_a, 2.0),
    )
    run_b = write_run(
        tmp_path / "B",
        {"model": "b.gguf"},
        records("greedy", correct_b, 0.5) + records("majority@4", correct_a, 3.0),
    )
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(run_a), str(run_b), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["settings_diff"] == ["model: 'a.gguf' -> 'b.gguf'"]
    by = {s["strategy"]: s for s in data["strategies"]}
    assert by["greedy"]["diff"] == pytest.approx(0.5) and by["greedy"]["p_value"] < 0.05
    assert by["majority@4"]["diff"] == 0 and by["majority@4"]["p_value"] == 1.0
    assert math.isclose(by["majority@4"]["cost_ratios"]["seconds"], 1.5)
    assert (run_b / "compare.png").stat().st_size > 0

    one = runner.invoke(app, ["compare", str(run_a), str(run_b), "-s", "greedy", "--json"])
    assert [s["strategy"] for s in json.loads(one.stdout)["strategies"]] == ["greedy"]
    table = runner.invoke(
        app, ["compare", str(run_a), str(run_b), "--plot", str(tmp_path / "c.png")]
    )
    assert table.exit_code == 0 and "greedy" in table.stdout and "0.50x" in table.stdout
    assert (tmp_path / "c.png").is_file()

    missing = runner.invoke(app, ["compare", str(run_a), str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a folder" in missing.stderr
    bad = runner.invoke(app, ["compare", str(run_a), str(run_b), "-s", "tree@8"])
    assert bad.exit_code == 2 and "not in both runs" in bad.stderr
