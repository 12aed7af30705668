"""The engine's seams for later features, on a tiny model: k tokens verified per step
(speculative decoding with a proposer), hidden states of chosen rows (verifier features),
and the executor interface.

Tolerances: hidden states within 1e-4 max abs of transformers' `output_hidden_states`
(fp32; summation order only). Greedy tokens must be identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from tests.conftest import assert_pool_full, make_tiny_model, tiny_llm
from ttscale import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = [[5, 17, 42, 99, 7, 250, 31], [8, 9, 10], [200, 100, 50, 25, 12, 6, 3, 1, 4, 44]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-seams")
    hf = make_tiny_model(path, "llama")
    return path, hf


def make_llm(model_dir, **options) -> LLM:
    return tiny_llm(model_dir[0], **options)


class OracleProposer:
    """Proposes the true greedy continuation (known from a plain run), `k` tokens at a time,
    with every `wrong_every`-th proposal corrupted so rollback is exercised too."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], k: int, wrong_every=0):
        self.continuations, self.k, self.wrong_every = continuations, k, wrong_every
        self.calls = 0

    def propose(self, seq_id: int, token_ids: Sequence[int]) -> list[int]:
        self.calls += 1
        for prompt, cont in self.continuations.items():
            n = len(prompt)
            if tuple(token_ids[:n]) == prompt:
                done = len(token_ids) - n
                drafts = list(cont[done : done + self.k])
                if self.wrong_every and self.calls % self.wrong_every == 0 and drafts:
                    drafts[len(drafts) // 2] = (drafts[len(drafts) // 2] + 1) % 256
                return drafts
        return []


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_speculative_steps_give_identical_greedy_output_in_fewer_steps(model_dir, wrong_every):
    plain = make_llm(model_dir)
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY)]
    plain_steps = plain.engine.stats["steps"]

    conts = {tuple(p): e for p, e in zip(PROMPTS, expected, strict=True)}
    proposer = OracleProposer(conts, k=4, wrong_every=wrong_every)
    spec = make_llm(model_dir, proposer=proposer)
    got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS, GREEDY)]
    assert got == expected
    stats = spec.engine.stats
    assert stats["steps"] < plain_steps
    assert 0 < stats["accepted_draft_tokens"] <= stats["draft_tokens"]
    if wrong_every:
        assert stats["accepted_draft_tokens"] < stats["draft_tokens"]  # some were rolled back
    assert_pool_full(spec)


def test_speculative_stop_inside_accepted_run_rolls_back(model_dir):
    """A stop token in the middle of accepted drafts ends the sequence there: no token after
    it is kept and the KV of a retained sequence matches its tokens."""
    plain = make_llm(model_dir)
    expected = plain.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids
    stop = expected[5]
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop])
    want = plain.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    spec = make_llm(model_dir, proposer=OracleProposer({tuple(PROMPTS[0]): expected}, k=8))
    engine = spec.engine
    request = engine.add_request("r", PROMPTS[0], params, retain=True)
    while not request.finished:
        engine.step()
    seq = request.sequences[0]
    assert seq.output_token_ids == want
    assert engine.block_manager.num_tokens(seq.seq_id) == seq.num_tokens - 1
    engine.check_integrity()
    engine.release("r")
    assert_pool_full(spec)


def test_hidden_states_match_transformers(model_dir):
    llm = make_llm(model_dir)
    hf = model_dir[1]
    layers = [0, 1, llm.config.num_hidden_layers]
    ours = llm.hidden_states(PROMPTS, layers)
    for prompt, h in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        assert h.shape == (len(prompt), len(layers), llm.config.hidden_size)
        for j, layer in enumerate(layers):
            assert (h[:, j] - ref[layer][0]).abs().max() < 1e-4
    # From a start position: only those rows; the shared prompt comes from the prefix cache.
    shared = PROMPTS[2][:8]
    tails = llm.hidden_states([[*shared, 3, 4], [*shared, 5]], [2], start=8)
    assert [t.shape[0] for t in tails] == [2, 1]
    full = llm.hidden_states([[*shared, 3, 4]], [2])[0]
    assert (tails[0][:, 0] - full[8:, 0]).abs().max() < 1e-5
    assert_pool_full(llm)


def test_sequences_in_one_step_get_their_own_layers(model_dir):
    """A step computes the union of its sequences' layers; each gets back only its own (a
    search's text probe and an answer probe's restatements can share a step)."""
    llm = make_llm(model_dir)
    engine = llm.engine
    a = engine.add_embed_request("a", PROMPTS[0], [0, 2], 0)
    b = engine.add_embed_request("b", PROMPTS[1], [1], 0)
    while not (a.finished and b.finished):
        engine.step()
    both = llm.hidden_states([PROMPTS[0], PROMPTS[1]], [0, 1, 2])
    got_a, got_b = a.sequences[0].hidden_states, b.sequences[0].hidden_states
    assert got_a.shape[1] == 2 and got_b.shape[1] == 1
    assert (got_a - both[0][:, [0, 2]]).abs().max() < 1e-5
    assert (got_b - both[1][:, [1]]).abs().max() < 1e-5
    engine.release("a")
    engine.release("b")
    assert_pool_full(llm)


def test_fork_embed_recomputes_only_the_tail(model_dir):
    """A finished, retained candidate is scored by recomputing its last tokens over the
    shared KV: hidden states equal a full pass, and the step computes only those tokens."""
    llm = make_llm(model_dir)
    engine = llm.engine
    request = engine.add_request("c", PROMPTS[0], GREEDY, retain=True)
    while not request.finished:
        engine.step()
    seq = request.sequences[0]
    child = engine.fork_embed(seq.seq_id, [1, 2], recompute=3)
    decode_before = engine.stats["decode_tokens"]
    while child.hidden_states is None:
        engine.step()
    assert engine.stats["decode_tokens"] - decode_before == 3
    full = llm.hidden_states([seq.token_ids], [1, 2])[0]
    # The KV was written by decode steps, the full pass by one prefill: fp32 rounding only.
    assert (child.hidden_states - full[-3:]).abs().max() < 1e-4
    engine.drop(child.seq_id)
    engine.release("c")
    assert_pool_full(llm)


def test_bad_hidden_state_requests_are_refused(model_dir):
    llm = make_llm(model_dir)
    with pytest.raises(ValueError, match="layers must be in"):
        llm.hidden_states([[1, 2, 3]], [99])
    with pytest.raises(ValueError, match="start must be in"):
        llm.hidden_states([[1, 2, 3]], [1], start=3)
    request = llm.engine.add_request("x", [1, 2, 3], GREEDY)  # not retained, not finished
    with pytest.raises(ValueError, match=r"not finished|holds no KV"):
        llm.engine.fork_embed(request.sequences[0].seq_id, [1])
    llm.engine.abort("x")
    done = llm.engine.add_request("y", [1, 2, 3], GREEDY, retain=True)
    while not done.finished:
        llm.engine.step()
    total = done.sequences[0].num_tokens
    for bad in (0, total + 1):
        with pytest.raises(ValueError, match=rf"recompute must be in \[1, {total}\]"):
            llm.engine.fork_embed(done.sequences[0].seq_id, [1], recompute=bad)
    llm.engine.release("y")
    assert_pool_full(llm)


def test_executor_seam_carries_the_step(model_dir):
    """The engine only talks to its executor: a wrapper sees every step's plain data."""
    llm = make_llm(model_dir)
    engine = llm.engine
    seen = []
    inner = engine.executor

    class Recording:
        num_blocks = inner.num_blocks

        def execute(self, batch):
            result = inner.execute(batch)
            seen.append((batch.num_tokens, result.shape.num_logits, result.logits.shape[0]))
            return result

        def shutdown(self):
            inner.shutdown()

    engine.executor = Recording()
    llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert seen[0] == (3, 1, 1) and all(s == (1, 1, 1) for s in seen[1:])
    assert engine.last_step is not None


def test_kv_pool_dtype_is_independent_of_the_weights(model_dir):
    """fp32 weights over a bf16 KV pool: the pool stores bf16, the cost model prices bf16 KV,
    and hidden states stay close to the fp32-KV run (bf16 rounding of K/V only)."""
    fp32 = make_llm(model_dir)
    bf16_kv = make_llm(model_dir, kv_cache_dtype="bfloat16")
    assert bf16_kv.engine.executor.kv_cache.dtype == torch.bfloat16
    assert next(bf16_kv.engine.model.parameters()).dtype == torch.float32
    a = fp32.hidden_states(PROMPTS, [2])
    b = bf16_kv.hidden_states(PROMPTS, [2])
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() / x.abs().max() < 2e-2
    out = bf16_kv.generate([PROMPTS[0]], GREEDY)[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert bf16_kv.engine.cost_meter.kv_bytes_per_value == 2
    assert_pool_full(bf16_kv)


def test_hidden_states_captured_while_generating(model_dir):
    """A request that asks for hidden states keeps, for each of its n samples, the rows of
    its generated tokens as decode computes them (no second pass); with the last token added
    by fork_embed they equal one full pass. Drafts that are rolled back leave no rows."""
    for proposer in (None, "oracle"):
        llm = make_llm(model_dir)
        if proposer:
            expected = llm.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids
            llm = make_llm(
                model_dir,
                proposer=OracleProposer({tuple(PROMPTS[0]): expected}, k=3, wrong_every=2),
            )
        engine = llm.engine
        params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
        request = engine.add_request("h", PROMPTS[0], params, retain=True, hidden_layers=[1, 2])
        while not request.finished:
            engine.step()
        prompt_len = len(PROMPTS[0])
        for seq in request.sequences:
            rows = seq.hidden_states
            assert rows.shape == (seq.num_tokens - 1 - prompt_len, 2, llm.config.hidden_size)
            last = engine.fork_embed(seq.seq_id, [1, 2], recompute=1)
            while last.hidden_states is None:
                engine.step()
            full = llm.hidden_states([seq.token_ids], [1, 2], start=prompt_len)[0]
            got = torch.cat([rows, last.hidden_states])
            assert (got - full).abs().max() / full.abs().max() < 1e-5
            engine.drop(last.seq_id)
        engine.release("h")
        assert_pool_full(llm)
