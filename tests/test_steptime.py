"""The step-time model: row tables, overhead features, the fit, storage, and calibration on an
engine (timing accuracy is the benchmark's job: benchmarks/bench_cost_model.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ttscale.cost.hardware import saved_profiles
from ttscale.cost.shapes import ModelShape, StepShape
from ttscale.cost.steptime import (
    FEATURES,
    CalibrationStep,
    RowTable,
    StepTimeModel,
    find_step_model,
    fit_overheads,
    overhead_features,
)

# Same dimensions as tests/test_cost.py's hand-checked shape.
TINY = ModelShape(
    layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, tied=True
)


def test_row_table_interpolates() -> None:
    table = RowTable((1, 4, 8), (1.0, 2.0, 6.0))
    assert table(0) == 0.0  # no rows, no matmul
    assert table(1) == 1.0 and table(4) == 2.0 and table(8) == 6.0
    assert table(2) == pytest.approx(1.0 + 1 / 3)  # linear between 1 and 4
    assert table(6) == pytest.approx(4.0)
    assert table(16) == pytest.approx(12.0)  # beyond the grid: proportional to rows
    assert RowTable((2,), (5.0,))(1) == 5.0  # below the grid: the weights are read anyway


@pytest.mark.parametrize(
    "rows, seconds",
    [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 1.0)), ((0, 1), (1.0, 1.0)), ((1,), (-1.0,))],
)
def test_row_table_rejects_bad_tables(rows, seconds) -> None:
    with pytest.raises(ValueError):
        RowTable(rows, seconds)


def test_overhead_features_by_hand() -> None:
    # 3 forked samples at context 22: 16 prefix tokens read once, 3 * 6 suffix tokens each.
    decode = StepShape(
        (1, 1, 1), (22, 22, 22), kv_tokens_read=16 + 18, kv_tokens_shared=16, shared_groups=1
    )
    x = dict(zip(FEATURES, overhead_features(TINY, decode, kv_bytes=4), strict=True))
    kv_token = 2 * 2 * 1 * 4 * 4  # K and V, 2 layers, 1 KV head, head_dim 4, fp32 = 64 B
    per_pair = 4 * 2 * 2 * 4  # 4 * layers * heads * head_dim FLOPs per (query, key) pair
    assert x == {
        "step": 1,
        "layer": 2,
        "hidden_element": 2 * 3 * 8,  # layers * tokens * hidden
        "sequence": 3,
        "kv_gathered_byte": 18 * kv_token,
        "kv_shared_byte": 16 * kv_token,
        "group_layer": 2,
        "decode_attention_flop": per_pair * 3 * 22,
        "prefill_attention_flop": 0,
    }
    # A 5-token chunk after 3 tokens of past: pairs 8+7+6+5+4 = 30, all "prefill" work.
    chunk = StepShape((5,), (8,))
    x = dict(zip(FEATURES, overhead_features(TINY, chunk, kv_bytes=4), strict=True))
    assert x["prefill_attention_flop"] == per_pair * 30
    assert x["decode_attention_flop"] == 0
    assert x["kv_gathered_byte"] == 8 * kv_token and x["kv_shared_byte"] == 0
    # Block top-k: 3 rows at context 40 read 24 tokens each on one of the 2 layers, so
    # per layer (mean) 3 * 8 tokens are skipped; attention FLOPs follow the pairs read.
    sparse = StepShape(
        (1, 1, 1), (40, 40, 40), kv_tokens_read=96, kv_blocks_scored=15, kv_tokens_skipped=24
    )
    x = dict(zip(FEATURES, overhead_features(TINY, sparse, kv_bytes=4), strict=True))
    assert x["decode_attention_flop"] == per_pair * (3 * 40 - 24)
    assert x["kv_gathered_byte"] == 96 * kv_token


def test_step_shape_rejects_bad_sharing() -> None:
    with pytest.raises(ValueError, match="kv_tokens_shared"):
        StepShape((1,), (4,), kv_tokens_read=4, kv_tokens_shared=5)
    with pytest.raises(ValueError, match="shared_groups"):
        StepShape((1,), (4,), shared_groups=-1)


def _steps() -> list[StepShape]:
    """Steps that exercise every feature independently enough for a unique fit."""
    steps = []
    for b, c in ((1, 8), (2, 40), (4, 16), (8, 64), (16, 8), (3, 100)):
        steps.append(StepShape((1,) * b, (c,) * b))  # independent decode
        prefix = c - 4
        steps.append(  # fork group: prefix read once
            StepShape((1,) * b, (c,) * b, prefix + 4 * b, kv_tokens_shared=prefix, shared_groups=1)
        )
    for t, past in ((4, 0), (32, 0), (64, 16), (128, 0)):
        steps.append(StepShape((t,), (past + t,)))
    return steps


def _model(coefficients: dict[str, float]) -> StepTimeModel:
    return StepTimeModel(
        shape=TINY,
        dtype="fp32",
        kv_bytes=4,
        threads=1,
        layer_linear=RowTable((1, 16, 128), (1e-4, 2e-4, 1e-3)),
        lm_head=RowTable((1, 16), (5e-5, 1e-4)),
        coefficients=coefficients,
        machine="local-test",
    )


def test_fit_recovers_the_times_that_generated_it() -> None:
    truth = _model(
        {
            "step": 2e-3,
            "layer": 0.0,  # collinear with "step" for one shape: only their sum is identifiable
            "hidden_element": 3e-8,
            "sequence": 5e-5,
            "kv_gathered_byte": 2e-10,
            "kv_shared_byte": 1e-10,
            "group_layer": 4e-5,
            "decode_attention_flop": 1e-11,
            "prefill_attention_flop": 2e-11,
        }
    )
    steps = [CalibrationStep(s, truth.predict(s)) for s in _steps()]
    fit = fit_overheads(TINY, 4, steps, truth.linear_time)
    assert max(abs(e) for e in fit.relative_errors) < 1e-6
    fitted = _model(fit.coefficients)
    for s in _steps():
        assert fitted.predict(s) == pytest.approx(truth.predict(s), rel=1e-6)
    # The decomposition: matmuls from the tables plus each feature's seconds.
    s = _steps()[1]
    assert truth.predict(s) == pytest.approx(
        truth.linear_time(s) + sum(truth.overhead_terms(s).values())
    )


def test_fit_keeps_coefficients_non_negative() -> None:
    # Steps measured *faster* than their matmuls alone: the overheads clip to zero.
    model = _model(dict.fromkeys(FEATURES, 0.0))
    steps = [CalibrationStep(s, 0.5 * model.linear_time(s)) for s in _steps()]
    fit = fit_overheads(TINY, 4, steps, model.linear_time)
    assert all(v == 0 for v in fit.coefficients.values())
    assert all(e == pytest.approx(-1.0) for e in fit.relative_errors)
    with pytest.raises(ValueError, match="no calibration steps"):
        fit_overheads(TINY, 4, [], model.linear_time)


def test_model_validation_round_trip_and_lookup(tmp_path) -> None:
    model = _model(dict.fromkeys(FEATURES, 1e-6))
    assert model.predict(StepShape((), ())) == 0.0  # nothing scheduled
    with pytest.raises(ValueError, match="lacks coefficients"):
        _model({"step": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        _model({**dict.fromkeys(FEATURES, 0.0), "step": math.nan})

    path = model.save(tmp_path)
    assert path.name == "local-test.steps.model.fp32.t1.json"
    assert saved_profiles(tmp_path) == []  # not offered as a hardware profile
    again = StepTimeModel.load(path)
    assert again == model
    step = _steps()[3]
    assert again.predict(step) == model.predict(step)

    renamed = ModelShape(**{**TINY.to_dict(), "name": "another-name"})
    assert find_step_model(renamed, "fp32", 1, machine="local-test", directory=tmp_path) == model
    assert find_step_model(TINY, "bf16", 1, machine="local-test", directory=tmp_path) is None
    assert find_step_model(TINY, "fp32", 2, machine="local-test", directory=tmp_path) is None
    bigger = ModelShape(**{**TINY.to_dict(), "layers": 3})
    assert find_step_model(bigger, "fp32", machine="local-test", directory=tmp_path) is None

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON step-time profile"):
        StepTimeModel.load(bad)
    data = model.to_dict()
    del data["lm_head"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing or bad field"):
        StepTimeModel.load(bad)
    # A damaged profile in the directory is skipped, not fatal.
    (tmp_path / "local-test.steps.zzz.fp32.t1.json").write_text("[]")
    assert find_step_model(TINY, "fp32", 1, machine="local-test", directory=tmp_path) == model


def test_calibrate_engine_on_tiny_model(model_dir) -> None:
    """Calibration runs synthetic steps on the engine's pool; afterwards the engine still
    generates exactly what it did before (the scribbled KV is never read as a cache hit)."""
    from ttscale import LLM, SamplingParams
    from ttscale.calibration.steps import calibrate_engine

    llm = LLM(model_dir, kv_cache_gb=0.05)
    prompt = "The quick brown fox"
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    before = llm.generate([prompt], greedy)[0].outputs[0].token_ids

    cal = calibrate_engine(llm.engine, reps=1)

    model = cal.model
    assert len(cal.steps) >= len(FEATURES)
    assert {s.step.shared_groups for s in cal.steps} == {0, 1}  # both decode paths ran
    assert any(s.step.kv_tokens_shared > 0 for s in cal.steps)
    assert all(np.isfinite(v) and v >= 0 for v in model.coefficients.values())
    assert model.matches(llm.engine.cost_meter.shape, "fp32")
    assert len(cal.fit.relative_errors) == len(cal.steps)
    assert model.predict(StepShape((1,) * 4, (100,) * 4)) > 0
    assert llm.generate([prompt], greedy)[0].outputs[0].token_ids == before
    kv = llm.engine.kv_stats()
    assert kv["num_free_blocks"] == kv["num_blocks"]

    llm.engine.add_request("busy", [5, 6, 7], greedy)
    with pytest.raises(RuntimeError, match="idle engine"):
        calibrate_engine(llm.engine, reps=1)


@pytest.mark.parametrize(("share", "n", "block"), [(True, 4, 4), (False, 4, None), (True, 1, 4)])
def test_estimate_predicted_time_is_the_sum_over_steps(share, n, block) -> None:
    """The closed-form decode sum equals pricing every step, and fork groups are reported as
    the engine's cascade path forms them (only with 2+ samples sharing a prefix)."""
    from ttscale.cost.analytic import RunSpec, decode_step, estimate, run_steps
    from ttscale.cost.hardware import PRESETS

    model = _model(dict.fromkeys(FEATURES, 1e-7))
    est = estimate(TINY, 9, 12, n, PRESETS["l4"], share, "fp32", block_size=block, step_model=model)
    steps = run_steps(RunSpec(9, 12, n, share, None, block))
    assert est.prefill.predicted_time == pytest.approx(model.predict(steps[0]))
    assert est.decode.predicted_time == pytest.approx(sum(map(model.predict, steps[1:])))
    assert est.predicted_time == pytest.approx(sum(map(model.predict, steps)))
    groups = decode_step(RunSpec(9, 12, n, share, None, block), 1).shared_groups
    assert groups == (1 if share and n > 1 else 0)
    with pytest.raises(ValueError, match="step-time calibration is for"):
        estimate(TINY, 9, 12, n, PRESETS["l4"], dtype="bf16", step_model=model)


def test_cli_calibrate_model_then_cost_predicts(model_dir, tmp_path, monkeypatch) -> None:
    """`ttscale calibrate --model` saves a step-time model that `ttscale cost --hardware
    local` then uses; a mismatched or missing one is a clear error."""
    import typer
    from typer.testing import CliRunner

    from ttscale.calibration import steps as calibrate_steps
    from ttscale.calibration.cli import calibrate_cmd
    from ttscale.cost import calibrate as cal_mod
    from ttscale.cost.cli import cost as cost_cmd

    cost_app = typer.Typer()  # the two commands as `ttscale.cli` registers them
    cost_app.command("cost")(cost_cmd)
    cost_app.command("calibrate")(calibrate_cmd)
    real_measure = cal_mod.measure
    monkeypatch.setattr(cal_mod, "measure", lambda seconds, threads: real_measure(0.05, threads))
    real_calibrate = calibrate_steps.calibrate_engine
    monkeypatch.setattr(
        calibrate_steps,
        "calibrate_engine",
        lambda engine, **kw: real_calibrate(engine, reps=1, **kw),
    )
    runner = CliRunner()
    args = ["calibrate", "--profile-dir", str(tmp_path), "--model", str(model_dir), "--json"]
    result = runner.invoke(cost_app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    saved = StepTimeModel.load(data["step_model_saved_to"])
    assert saved.shape.name == model_dir.name and saved.threads == 1

    config = str(model_dir / "config.json")
    cost = ["cost", "-m", config, "-p", "32", "-g", "16", "--dtype", "fp32", "--json"]
    local = [*cost, "--hardware", "local", "--profile-dir", str(tmp_path)]
    out = json.loads(runner.invoke(cost_app, local).stdout)
    assert out["total"]["predicted_time_s"] > 0
    assert out["step_model_source"] == saved.source
    # Presets describe other machines: this machine's calibration does not apply.
    out = json.loads(runner.invoke(cost_app, [*cost, "--hardware", "h100"]).stdout)
    assert out["total"]["predicted_time_s"] is None
    wrong = runner.invoke(
        cost_app, [*cost, "-m", "default", "--step-model", data["step_model_saved_to"]]
    )
    assert wrong.exit_code == 2 and "calibrated for" in wrong.output
    missing = runner.invoke(cost_app, [*cost, "--step-model", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2
