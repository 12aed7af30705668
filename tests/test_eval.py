"""The evaluation harness on a tiny random model: records, summary, resume, reports, CLI.

The tiny model's completions are noise, so a test task judges them by a property of the text
(its length mod 3) to get a mix of right and wrong candidates; the summary is then recomputed
by brute force from records.jsonl.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttscale import SamplingParams
from ttscale.eval.cli import make_app
from ttscale.eval.harness import run_eval
from ttscale.eval.metrics import wilson_interval
from ttscale.eval.report import axis_key, markdown_summary, pareto_frontier, summary_table
from ttscale.eval.store import RECORDS_FILE, SettingsMismatch, load_records
from ttscale.eval.summary import k_values
from ttscale.tasks import JsonlTask
from ttscale.tts.hygiene import Hygiene
from ttscale.tts.votes import majority_vote

PROBLEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4\n#### 1"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "12*2\n#### 0"},
    {"question": "Sara had 10 dollars and spent 6. How many are left?", "answer": "10-6\n#### 2"},
]
PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1)


class LengthModTask(JsonlTask):
    """GSM8K-style file; the 'answer' of a completion is its length mod 3."""

    def extract_answer(self, completion: str) -> str | None:
        return str(len(completion) % 3)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "gsm.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(task_file) -> LengthModTask:
    return LengthModTask(task_file)


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RECORDS_FILE).read_text().splitlines()]


def evaluate(llm, task, strategies, out, **kw):
    """The tiny model's answers are cut off: hygiene is off so the bookkeeping is tested on
    answers that vary (hygiene has its own tests in test_hygiene.py)."""
    kw.setdefault("params", PARAMS)
    kw.setdefault("hygiene", Hygiene(enabled=False))
    return run_eval(llm, task, strategies, 3, out, progress=False, **kw)


# ---- records and summary ----------------------------------------------------------------------


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def brute_maj_at_k(answers: list, right: set, k: int) -> float:
    subsets = list(itertools.combinations(answers, k))
    return sum(majority_vote(list(s))[0] in right for s in subsets) / len(subsets)


def test_eval_records_summary_and_plot(llm, task, tmp_path):
    specs = ["greedy", "majority@4", "beam@4/2"]
    summary = evaluate(llm, task, specs, tmp_path, concurrency=2)
    for name in ("run.json", "records.jsonl", "summary.json", "summary.md"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    records = lines(tmp_path)
    assert sorted((r["strategy"], r["problem_id"]) for r in records) == sorted(
        (s, f"gsm:{i}") for s in specs for i in range(3)
    )
    problems = {p.id: p for p in task.problems(3)}
    all_correct = []
    for r in records:
        p = problems[r["problem_id"]]
        assert r["question"] == p.question and r["reference"] == p.answer
        assert r["correct"] == task.is_correct(p, r["answer"])
        for c in r["candidates"]:
            assert c["correct"] == task.is_correct(p, c["answer"])
            all_correct.append(c["correct"])
        assert r["generated_tokens"] == sum(c["tokens"] for c in r["candidates"]) > 0
        assert r["prompt_tokens"] == r["computed_prompt_tokens"] + r["cached_prompt_tokens"]
    assert any(all_correct) and not all(all_correct)  # the recomputation below means something

    rows = {row["strategy"]: row for row in summary["strategies"]}
    assert list(rows) == specs and summary["n_problems"] == 3
    for spec in specs:
        rs = [r for r in records if r["strategy"] == spec]
        row = rows[spec]
        # Chunks of 2 then 1: amortized time is the chunk's time split evenly.
        assert [r["chunk_size"] for r in rs] == [2, 2, 1]
        assert rs[0]["amortized_time"] == rs[1]["amortized_time"]
        n_correct = sum(r["correct"] for r in rs)
        assert row["n"] == 3 and row["n_correct"] == n_correct
        assert row["accuracy"] == pytest.approx(n_correct / 3)
        assert (row["accuracy_lo"], row["accuracy_hi"]) == pytest.approx(
            wilson_interval(n_correct, 3)
        )
        cover = sum(any(c["correct"] for c in r["candidates"]) for r in rs) / 3
        assert row["coverage"] == pytest.approx(cover)
        assert row["mean_tokens"] == pytest.approx(sum(r["generated_tokens"] for r in rs) / 3)
        assert row["total_wall_time"] == pytest.approx(sum(r["amortized_time"] for r in rs))
        assert row["mean_peak_kv_blocks"] == pytest.approx(sum(r["peak_kv_blocks"] for r in rs) / 3)
        if "flops" in rs[0]:  # cost-model fields are carried when the engine reports them
            assert row["mean_flops"] == pytest.approx(sum(r["flops"] for r in rs) / 3)
        n_cands = min(len(r["candidates"]) for r in rs)
        if n_cands < 2:
            assert "pass_at_k" not in row
            continue
        assert list(row["pass_at_k"]) == [str(k) for k in k_values(n_cands)]
        for k in k_values(n_cands):
            cands = [r["candidates"][:n_cands] for r in rs]
            expect_pass = sum(brute_pass_at_k([c["correct"] for c in cs], k) for cs in cands)
            right = [{c["answer"] for c in cs if c["correct"]} for cs in cands]
            expect_maj = sum(
                brute_maj_at_k([c["answer"] for c in cs], ok, k)
                for cs, ok in zip(cands, right, strict=True)
            )
            assert row["pass_at_k"][str(k)] == pytest.approx(expect_pass / 3)
            assert row["maj_at_k"][str(k)] == pytest.approx(expect_maj / 3)
    assert "majority@4" in (tmp_path / "summary.md").read_text()


def test_reports(llm, task, tmp_path):
    from ttscale.eval.report import pareto_plot

    summary = evaluate(llm, task, ["greedy", "majority@4"], tmp_path)
    png = pareto_plot(summary, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = pareto_plot(summary, tmp_path / "tok.png", x="tokens")  # one panel
    assert single.stat().st_size > 0
    assert axis_key(summary["strategies"], "wall_time") == "mean_wall_time"
    with pytest.raises(ValueError, match="usable"):
        axis_key(summary["strategies"], "nonsense")
    assert summary_table(summary).row_count == 2
    assert markdown_summary(summary).count("\n| ") == 3  # header + 2 rows


def test_pareto_frontier():
    costs = [1.0, 2.0, 3.0, 4.0, 2.0, 0.5]
    scores = [0.1, 0.5, 0.4, 0.9, 0.5, 0.0]
    assert pareto_frontier(costs, scores) == [5, 0, 1, 3]
    assert pareto_frontier([], []) == []


# ---- resume -----------------------------------------------------------------------------------


def test_resume_skips_finished_pairs(llm, task, tmp_path):
    evaluate(llm, task, ["greedy"], tmp_path)
    # Mark the first run's records: a recomputed record would lose the marker.
    marked = [{**r, "marker": True} for r in lines(tmp_path)]
    (tmp_path / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in marked))
    summary = evaluate(llm, task, ["greedy", "majority@4"], tmp_path)
    records = lines(tmp_path)
    assert len(records) == 6
    assert len({(r["strategy"], r["problem_id"]) for r in records}) == 6
    assert all(r.get("marker") for r in records if r["strategy"] == "greedy")
    assert not any(r.get("marker") for r in records if r["strategy"] == "majority@4")
    assert [row["strategy"] for row in summary["strategies"]] == ["greedy", "majority@4"]


def test_truncated_last_line_is_recomputed(llm, task, tmp_path):
    evaluate(llm, task, ["greedy"], tmp_path)
    path = tmp_path / RECORDS_FILE
    text = path.read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[: last_start + 40])  # killed mid-write of the third record
    assert len(load_records(path)) == 2
    assert path.read_text() == text[:last_start]  # cut back to the last complete line
    evaluate(llm, task, ["greedy"], tmp_path)
    assert sorted(r["problem_id"] for r in lines(tmp_path)) == ["gsm:0", "gsm:1", "gsm:2"]


def test_load_records_tail_and_corruption(tmp_path):
    path = tmp_path / "r.jsonl"
    a, b = {"strategy": "s", "problem_id": "a"}, {"strategy": "s", "problem_id": "b"}
    path.write_text(json.dumps(a) + "\n" + json.dumps(b))  # complete, newline missing
    assert load_records(path) == [a, b]
    assert path.read_text().endswith("}\n")
    path.write_text("{oops\n" + json.dumps(a) + "\n")
    with pytest.raises(ValueError, match=":1: corrupt"):
        load_records(path)


def test_changed_settings_are_refused(llm, task, tmp_path):
    evaluate(llm, task, ["greedy"], tmp_path)
    hotter = SamplingParams(temperature=0.5, top_p=0.95, max_tokens=12, seed=1)
    with pytest.raises(SettingsMismatch, match="temperature"):
        evaluate(llm, task, ["greedy"], tmp_path, params=hotter)
    with pytest.raises(SettingsMismatch, match="seed"):
        evaluate(llm, task, ["greedy"], tmp_path, seed=5)
    evaluate(llm, task, ["majority@4"], tmp_path, params=hotter, resume=False)
    assert {r["strategy"] for r in lines(tmp_path)} == {"majority@4"}


# ---- CLI --------------------------------------------------------------------------------------


def test_cli(model_dir, task_file, tmp_path):
    runner = CliRunner()
    app = make_app()
    common = ["--model", str(model_dir), "--max-tokens", "8", "--kv-cache-gb", "0.01"]
    out = tmp_path / "run"
    args = ["eval", "--task", str(task_file), "-n", "2", "-s", "greedy,majority@2", "-o", str(out)]
    result = runner.invoke(app, [*args, *common, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [r["strategy"] for r in summary["strategies"]] == ["greedy", "majority@2"]
    assert (out / "pareto.png").is_file()

    bad = runner.invoke(app, [*args, *common, "-s", "greedy,majority@x"])
    assert bad.exit_code == 2 and "error" in bad.stderr and "Traceback" not in bad.output
    bad = runner.invoke(app, [*args, *common, "--temperature", "0.1"])  # other settings
    assert bad.exit_code == 2 and "--no-resume" in bad.stderr
    bad = runner.invoke(app, ["eval", "--task", str(tmp_path / "missing.jsonl"), *common])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1

    solved = runner.invoke(app, ["solve", "12 + 30 =", "-s", "majority@2", *common, "--json"])
    assert solved.exit_code == 0, solved.output
    data = json.loads(solved.stdout)
    assert len(data["candidates"]) == 2 and data["stats"]["generated_tokens"] > 0
    plain = runner.invoke(app, ["solve", "12 + 30 =", "-s", "greedy", *common])
    assert plain.exit_code == 0 and plain.stdout.strip()


def test_forks_and_adaptive_prompt_sharing_in_records(llm, task, tmp_path):
    """Honest counters: majority@4 is one prompt forked 3 ways; adaptive's later waves start
    on a kept first-wave sample's KV, so each computes only the prompt's last token (the
    prefix cache alone would recompute the partial last block every wave)."""
    from tests.conftest import assert_pool_full

    evaluate(llm, task, ["majority@4", "adaptive@12"], tmp_path)
    by = {(r["strategy"], r["problem_id"]): r for r in lines(tmp_path)}
    for (strategy, _), r in by.items():
        prompt = r["prompt_tokens"]
        if strategy == "majority@4":
            assert r["forks"] == 3
            assert r["computed_prompt_tokens"] + r["cached_prompt_tokens"] == prompt
            continue
        waves = r["extra"]["waves"]
        assert r["n_candidates"] == r["extra"]["samples"] == 4 * waves
        # Wave 1 prefills (the prefix cache may serve its full blocks); each later wave
        # computes one token and takes the other prompt tokens from the kept sample.
        first = r["computed_prompt_tokens"] - (waves - 1)
        assert first + r["cached_prompt_tokens"] - (waves - 1) * (prompt - 1) == prompt
        assert r["forks"] == 3 * waves + (waves - 1)  # + each later wave's fork of the kept one
    assert any(r["extra"]["waves"] > 1 for (s, _), r in by.items() if s == "adaptive@12")
    assert_pool_full(llm)
