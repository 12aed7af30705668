"""The compiled decode step (models/compiled.py): the same tokens and, within a stated
tolerance, the same log-probabilities as eager; compile failures fall back to eager.

One test compiles (a 2-layer tiny model, single-stream and 3-row decode graphs); the others
never call the compiler."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llm
from ttscale.models.compiled import CompileConfig
from ttscale.sampling.params import SamplingParams

# Inductor fuses and reorders fp32 reductions (RMSNorm's mean, RoPE's products): last-bit
# differences, measured ~1e-6 on the tiny model; the bound leaves room, far below a
# near-tie of the std-0.3 weights.
LOGPROB_TOLERANCE = 1e-4

# Longer than CompileConfig.max_rows: the prefill stays eager, so only decode steps compile.
_PROMPTS = [list(range(10, 80)), [5, 6, 7, 8, 9, 10, 11, 12] * 9]


def _outputs(llm, params: SamplingParams):
    outs = llm.generate(_PROMPTS, params, use_tqdm=False)
    return [c for o in outs for c in o.outputs]


def test_compiled_matches_eager(model_dir: Path) -> None:
    eager = tiny_llm(model_dir)
    compiled = tiny_llm(model_dir, compile=True)
    forward = compiled.engine.executor.forward
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    ours, ref = _outputs(compiled, params), _outputs(eager, params)
    assert forward.failed is None
    assert [c.token_ids for c in ours] == [c.token_ids for c in ref]
    pairs = [
        (a, b)
        for x, y in zip(ours, ref, strict=True)
        for a, b in zip(x.logprobs, y.logprobs, strict=True)
    ]
    diff = max(abs(a - b) for a, b in pairs)
    assert diff < LOGPROB_TOLERANCE
    # n = 3 samples: decode steps of 3 rows (a graph with a symbolic row count), forks.
    params = SamplingParams(n=3, temperature=0.8, seed=0, max_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in _outputs(compiled, params)] == [
        c.token_ids for c in _outputs(eager, params)
    ]
    compiled.engine.check_integrity()


def test_compile_failure_falls_back_to_eager(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A machine without a C++ compiler: the first compiled step fails inside dynamo /
    inductor; that step and every later one run eager, and it is said once."""
    from torch._dynamo.exc import TorchDynamoException

    eager = tiny_llm(model_dir)
    llm = tiny_llm(model_dir, compile=True)
    forward = llm.engine.executor.forward
    calls = []

    def broken(*args):
        calls.append(1)
        raise TorchDynamoException("no working C++ compiler found")

    forward._compiled = broken
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="ttscale.models.compiled"):
        ours = _outputs(llm, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in _outputs(eager, params)]
    assert len(calls) == 1 and forward.failed is not None
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed (TorchDynamoException: no working C++ compiler found); running eager"
    ]


def test_model_errors_are_not_swallowed(model_dir: Path) -> None:
    """Only the compiler's own failures fall back; an error of the step itself surfaces."""
    llm = tiny_llm(model_dir, compile=True)

    def failing(*args):
        raise RuntimeError("out of memory")

    llm.engine.executor.forward._compiled = failing
    with pytest.raises(Exception, match="out of memory"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), use_tqdm=False)


def test_steps_that_stay_eager(model_dir: Path) -> None:
    forward = tiny_llm(model_dir, compile=True).engine.executor.forward
    assert forward.uses_graph(1, None) and forward.uses_graph(64, None)
    assert not forward.uses_graph(65, None)  # prefill-sized: matmul-bound
    assert not forward.uses_graph(1, object())  # hidden-state capture
    assert not tiny_llm(model_dir).engine.executor.forward.uses_graph(1, None)  # default off


def test_bad_compile_options() -> None:
    with pytest.raises(ValueError, match="compile must be True or False"):
        CompileConfig(enabled="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        CompileConfig(enabled=True, max_rows=0)


def test_rope_table_reserved_for_the_graph(model_dir: Path) -> None:
    """The compiled graph reads the RoPE table without growing it: the runner reserves the
    whole context up front."""
    llm = tiny_llm(model_dir, compile=True)
    rotary = llm.engine.model.rotary
    assert rotary._cos.shape[0] >= llm.engine.max_model_len
    positions = torch.tensor([llm.engine.max_model_len - 1])
    q = torch.randn(1, 4, 16)
    rotary(positions, q, q[:, :2])  # eager path: no growth needed
