"""The main CLI: light imports, --version, chat's commands and Ctrl-C, tables that fit 100
columns, and the eval checks that run before a model loads (a model load is made to fail,
so a check that comes after it would show)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ttscale import cli
from ttscale.eval.report import pareto_figure, print_summary
from ttscale.eval.summary import summarize_records

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [
    {"question": "What is 3 + 4?", "answer": "#### 7"},
    {"question": "What is 12 * 2?", "answer": "#### 24"},
    {"question": "What is 10 - 6?", "answer": "#### 4"},
]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **env},
    )


# ---- imports and help ---------------------------------------------------------------------


def test_help_and_argument_errors_do_not_import_torch() -> None:
    """`ttscale --help` lists every command, and a bad option is refused, without importing
    torch or any subsystem's command module (what made them take seconds)."""
    code = """
import sys
from typer.testing import CliRunner
import ttscale.cli as cli

listing = CliRunner().invoke(cli.app, ["--help"])
assert listing.exit_code == 0, listing.output
for name in ("generate", "chat", *cli.SUBCOMMANDS):
    assert name in listing.output, name
bad = CliRunner().invoke(cli.app, ["generate", "hi", "--quantize", "int3"])
assert bad.exit_code == 2 and "int3" in bad.output, bad.output
heavy = [m for m in ("torch", "transformers", "scipy", "ttscale.plan.cli", "ttscale.cost.cli")
         if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_subcommand_help_loads_only_its_module() -> None:
    res = CliRunner().invoke(cli.app, ["compare", "--help"])
    assert res.exit_code == 0 and "--strategy" in res.output
    res = CliRunner().invoke(cli.app, ["eval", "--help"])
    assert res.exit_code == 0 and "--wide" in res.output and "--dtype" in res.output


def test_version() -> None:
    res = CliRunner().invoke(cli.app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("ttscale ")


# ---- chat ---------------------------------------------------------------------------------


def test_chat_commands(tmp_path: Path) -> None:
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert cli._chat_command("/reset", history) and history == [history[0]]
    history.append({"role": "user", "content": "again"})
    assert cli._chat_command("/system  you are a pirate ", history)
    assert history == [{"role": "system", "content": "you are a pirate"}]
    assert cli._chat_command("/system", history) and history == []
    history.append({"role": "user", "content": "x"})
    saved = tmp_path / "chat.json"
    assert cli._chat_command(f"/save {saved}", history)
    assert json.loads(saved.read_text()) == history
    assert cli._chat_command("/help", history) and cli._chat_command("/nope", history)
    assert history == [{"role": "user", "content": "x"}]  # /help and unknown change nothing
    assert not cli._chat_command("/exit", history) and not cli._chat_command("/quit", history)


class _Out:
    def __init__(self, delta: str, finish: str | None) -> None:
        self.text_delta, self.finish_reason = delta, finish


class _FakeLLM:
    """Streams 'a b c ...' one word a step; the first reply gets a Ctrl-C after two words,
    the second runs out of --max-tokens. Records whether each stream was closed early."""

    class tokenizer:
        @staticmethod
        def apply_chat_template(history: list[dict[str, str]]) -> str:
            return " ".join(m["content"] for m in history)

        @staticmethod
        def encode(text: str, add_special_tokens: bool = False) -> list[int]:
            return [1] * len(text.split())

    class engine:
        max_model_len = 1000

    def __init__(self) -> None:
        self.replies = 0
        self.closed: list[bool] = []

    def stream(self, ids, params, text):
        self.replies += 1
        interrupt = self.replies == 1
        finished = False
        try:
            for i, word in enumerate(["a", "b", "c", "d"]):
                if interrupt and i == 2:
                    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C
                last = i == 3
                finished = last
                yield type("R", (), {"outputs": [_Out(word + " ", "length" if last else None)]})
        finally:
            self.closed.append(not finished)


def test_chat_ctrl_c_stops_only_the_reply(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = _FakeLLM()
    monkeypatch.setattr(cli, "_load", lambda *a, **k: fake)
    saved = tmp_path / "c.json"
    res = CliRunner().invoke(
        cli.app, ["chat", "--max-tokens", "4"], input=f"first\nsecond\n/save {saved}\n/exit\n"
    )
    assert res.exit_code == 0, res.output
    assert fake.replies == 2 and fake.closed == [True, False]  # the first was aborted
    assert "[stopped]" in res.stderr and "[cut off at --max-tokens 4]" in res.stderr
    history = json.loads(saved.read_text())
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"].split() == ["a", "b", "c"]  # stopped after the third word
    assert history[3]["content"].split() == ["a", "b", "c", "d"]


# ---- tables and plots ---------------------------------------------------------------------


def synthetic_records(strategy: str, n: int, k: int, session: str = "s1") -> list[dict]:
    out = []
    for i in range(n):
        cands = [{"answer": str(j % 3), "correct": j % 3 == i % 3} for j in range(k)]
        out.append({
            "strategy": strategy, "problem_id": f"p{i}", "correct": i % 2 == 0,
            "candidates": cands, "n_candidates": k, "generated_tokens": 1234.5 * k,
            "prompt_tokens": 62, "computed_prompt_tokens": 62, "cached_prompt_tokens": 940,
            "forks": k - 1, "peak_kv_blocks": 123, "wall_time": 12.5, "amortized_time": 11.25,
            "flops": 1.23e13, "bytes": 4.56e12, "roofline_time": 0.0123, "session": session,
        })  # fmt: skip
    return out


def summary_of(*strategies: str, n: int = 24, sessions: int = 1) -> dict:
    records = []
    for s in strategies:
        k = int(s.split("@")[1].split(":")[0].split("/")[0]) if "@" in s else 1
        for j in range(sessions):
            part = synthetic_records(s, n, k, f"s{j}")
            records += part[j::sessions]
    return {
        "settings": {
            "model": "/x/SmolLM2-135M-Instruct.Q4_1.gguf",
            "task": {"name": "gsm_symbolic"},
            "params": {"max_tokens": 160},
        },
        "n_problems": n,
        "strategies": summarize_records(records),
    }


LONG = ("greedy", "majority@16:t=0.5,p=0.95", "weighted@16", "beam@16/4", "adaptive@64")


def test_summary_table_fits_100_columns() -> None:
    out = io.StringIO()
    print_summary(summary_of(*LONG), Console(file=out, width=100))
    text = out.getvalue()
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 100
    for s in LONG:
        assert s in text
    wide = io.StringIO()
    print_summary(summary_of(*LONG), Console(file=wide, width=250), wide=True)
    assert "cover%" in wide.getvalue() and "cover%" not in text


def test_eval_table_at_columns_100_in_a_subprocess(tmp_path: Path) -> None:
    """The table as `ttscale eval` prints it, piped, with COLUMNS=100."""
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary_of(*LONG)))
    code = f"""
import json
from ttscale.eval.report import print_summary
print_summary(json.load(open({str(path)!r})))
"""
    proc = run_python(code, COLUMNS="100")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and max(map(len, proc.stdout.splitlines())) <= 100


def test_mixed_timings_are_pointed_out() -> None:
    out = io.StringIO()
    print_summary(summary_of("greedy", sessions=2), Console(file=out, width=100))
    assert "several runs" in out.getvalue()
    out = io.StringIO()
    print_summary(summary_of("greedy"), Console(file=out, width=100))
    assert "several runs" not in out.getvalue()


def test_pareto_figure_title_ceiling_and_zero_note() -> None:
    import matplotlib.pyplot as plt

    summary = summary_of("greedy", "majority@8")
    fig = pareto_figure(summary)
    title = fig._suptitle.get_text()
    assert "gsm_symbolic" in title and "SmolLM2" in title and "24 problems" in title
    assert "max 160 tokens" in title
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert any("pass@8 ceiling" in label for label in labels)
    assert not any("0%" in t.get_text() for ax in fig.axes for t in ax.texts)
    plt.close(fig)

    for row in summary["strategies"]:
        row["accuracy"] = row["accuracy_lo"] = 0.0
    fig = pareto_figure(summary)
    assert any("scored 0%" in t.get_text() for ax in fig.axes for t in ax.texts)
    plt.close(fig)


# ---- eval: checks before the model loads -------------------------------------------------


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    import ttscale.llm

    monkeypatch.setattr(ttscale.llm.LLM, "__init__", refuse)


def test_eval_refusals_before_the_model_loads(model_dir, task_file, tmp_path, no_load) -> None:
    runner = CliRunner()
    base = ["eval", "--task", str(task_file), "--model", str(model_dir), "-o", str(tmp_path)]
    res = runner.invoke(cli.app, [*base, "--scorer", "foo"])
    assert res.exit_code == 2 and "unknown scorer 'foo'" in res.stderr
    res = runner.invoke(cli.app, [*base, "--scorer", "probe:/no/such/probe"])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = runner.invoke(cli.app, [*base, "-s", "MAJORTY@8"])
    assert res.exit_code == 2 and "did you mean majority@8" in res.stderr
    res = runner.invoke(cli.app, [*base, "--dtype", "float64"])
    assert res.exit_code == 2 and "float64" in res.output


def test_eval_resume_checks_before_the_model_loads(
    model_dir, task_file, tmp_path, monkeypatch
) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    base = ["eval", "--task", str(task_file), "--model", str(model_dir), "-o", str(out),
            "--max-tokens", "6", "--kv-cache-gb", "0.01"]  # fmt: skip
    first = runner.invoke(cli.app, [*base, "-n", "10", "-s", "greedy,majority@2", "--json"])
    assert first.exit_code == 0, first.output
    assert "has 3 problems, not 10: running 3" in " ".join(first.stderr.split())
    assert json.loads(first.stdout)["n_problems"] == 3
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    # majority@2: the engine forked the prefilled prompt once per problem; greedy never.
    assert {r["strategy"]: r["forks"] for r in records} == {"greedy": 0, "majority@2": 1}

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    import ttscale.llm

    monkeypatch.setattr(ttscale.llm.LLM, "__init__", refuse)
    done = runner.invoke(cli.app, [*base, "-n", "3", "-s", "greedy", "--json"])
    assert done.exit_code == 0, done.output
    assert "nothing to run" in done.stderr
    assert [s["strategy"] for s in json.loads(done.stdout)["strategies"]] == ["greedy"]
    other = runner.invoke(cli.app, [*base, "-n", "3", "-s", "greedy", "--temperature", "0.2"])
    assert other.exit_code == 2 and "--no-resume" in other.stderr


def test_eval_refuses_max_tokens_past_the_context(model_dir, task_file, tmp_path) -> None:
    res = CliRunner().invoke(
        cli.app,
        ["eval", "--task", str(task_file), "--model", str(model_dir), "-o", str(tmp_path),
         "--max-tokens", "100000", "--kv-cache-gb", "0.01"],
    )  # fmt: skip
    assert res.exit_code == 2 and "does not fit the context" in res.stderr
    assert not (tmp_path / "records.jsonl").exists()


def test_eval_interrupt_prints_the_resume_command(
    model_dir, task_file, tmp_path, monkeypatch
) -> None:
    import ttscale.eval.harness

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ttscale.eval.harness, "run_eval", interrupted)
    args = ["eval", "--task", str(task_file), "--model", str(model_dir), "-o", str(tmp_path),
            "--kv-cache-gb", "0.01", "--max-tokens", "6", "--no-resume"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["ttscale", *args])
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 130
    text = " ".join(res.stderr.split())
    assert "interrupted" in text and "holds 0 results" in text and "Resume with:" in text
    assert "--no-resume" not in text.split("Resume with:")[1]


def test_solve_progress_drives_the_strategy(llm) -> None:
    """The progress wrapper is what `drive` steps: same result as without it, and it counted
    the engine's steps."""
    from ttscale import SamplingParams
    from ttscale.eval.solve_cli import _solve_one, _solve_progress
    from ttscale.strategies.api import make_query

    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    results = []
    for enabled in (True, False):
        query = make_query(llm, "12 + 30 =", params=params)
        with _solve_progress(llm.engine, "majority@3", enabled=enabled) as engine:
            results.append(_solve_one(engine, llm, query, "majority@3"))
            if enabled:
                assert engine is not llm.engine and engine.steps > 0
    assert [c.text for c in results[0].candidates] == [c.text for c in results[1].candidates]
    assert results[0].stats.forks == 2


def test_split_specs_keeps_sampling_options_together() -> None:
    from ttscale.eval.cli import split_specs

    assert split_specs("greedy, majority@4:t=0.5,p=0.95,bon@8") == [
        "greedy",
        "majority@4:t=0.5,p=0.95",
        "bon@8",
    ]
    assert split_specs("greedy,,majority@8") == ["greedy", "majority@8"]
    assert split_specs("p=0.9,greedy") == ["p=0.9", "greedy"]  # refused later, as written
