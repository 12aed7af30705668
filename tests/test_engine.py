"""The engine end to end on a tiny model: batching, chunking, preemption, forks, prefix cache.

Every test ends with the KV pool full again and the block manager's integrity check passing.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_pool_full, make_tiny_model, tiny_llm
from ttscale import LLM, SamplingParams

GREEDY_LONG = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_model(path, "llama")
    return path, hf


def make_llm(model_dir, **options) -> LLM:
    return tiny_llm(model_dir[0], **options)


PROMPTS = [
    [5, 17, 42, 99, 7, 250, 31],
    [8, 9, 10],
    [200, 100, 50, 25, 12, 6, 3, 1, 4, 44, 45],
    [77],
]


def greedy_single(model_dir, prompt, max_tokens=24):
    llm = make_llm(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def test_greedy_matches_transformers(model_dir):
    llm = make_llm(model_dir)
    outs = llm.generate(PROMPTS, GREEDY_LONG)
    hf = model_dir[1]
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
    assert_pool_full(llm)


def test_batched_chunked_and_preempted_runs_equal_single_runs(model_dir):
    singles = [greedy_single(model_dir, p) for p in PROMPTS]
    # Chunked prefill: at most 5 tokens per step, so prompts are split across steps.
    chunked = make_llm(model_dir, max_num_batched_tokens=5)
    assert [o.outputs[0].token_ids for o in chunked.generate(PROMPTS, GREEDY_LONG)] == singles
    assert_pool_full(chunked)
    # A pool of 14 blocks of 4 tokens cannot hold four 31-35-token sequences: preemption.
    tight = make_llm(model_dir, kv_cache_gb=14 * 2 * 2 * 4 * 2 * 16 * 4 / 2**30)
    assert tight.engine.block_manager.num_blocks == 14
    outs = tight.generate(PROMPTS, GREEDY_LONG)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == singles
    assert_pool_full(tight)


def test_parallel_sampling_prefills_prompt_once(model_dir):
    llm = make_llm(model_dir)
    prompt = PROMPTS[2]
    out = llm.generate([prompt], SamplingParams(n=8, temperature=0.0, max_tokens=10))[0]
    assert len(out.outputs) == 8
    assert out.usage.computed_prompt_tokens == len(prompt)
    single = greedy_single(model_dir, prompt, 10)
    assert all(o.token_ids == single for o in out.outputs)
    assert_pool_full(llm)


def test_fork_of_64_allocates_no_prompt_blocks(model_dir):
    llm = make_llm(model_dir, block_size=4)
    engine, bm = llm.engine, llm.engine.block_manager
    prompt = list(range(3, 3 + 21))  # 21 tokens: 5 full blocks + 1 partial
    engine.add_request("r", prompt, SamplingParams(n=64, temperature=1.0, seed=0, max_tokens=3))
    engine.step()  # prefill once, then fork into 64 samples
    assert len(engine.requests["r"].sequences) == 64
    assert bm.num_used_blocks == 6  # the prompt's blocks only, shared by all 64
    bm.check_integrity()
    engine.step()  # each sample writes its first token: copy-on-write of the partial block
    assert bm.num_used_blocks == 6 + 63
    while engine.has_unfinished:
        engine.step()
    assert_pool_full(llm)


def test_seeded_sampling_is_independent_of_batch(model_dir):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = make_llm(model_dir).generate([PROMPTS[0]], params)[0]
    noisy = SamplingParams(n=2, temperature=1.3, seed=7, max_tokens=5)
    llm = make_llm(model_dir)
    together = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[3]], [noisy, params, noisy])[1]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in together.outputs]
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1  # samples do differ
    assert_pool_full(llm)


def test_seeded_sampling_survives_preemption(model_dir):
    params = SamplingParams(n=4, temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)
    roomy = make_llm(model_dir).generate(PROMPTS[:2], params)
    tight = make_llm(model_dir, kv_cache_gb=12 * 2 * 2 * 4 * 2 * 16 * 4 / 2**30)
    squeezed = tight.generate(PROMPTS[:2], params)
    assert tight.engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, squeezed, strict=True):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert_pool_full(tight)


def test_prefix_cache_across_requests(model_dir):
    llm = make_llm(model_dir, block_size=4)
    prompt = list(range(10, 24))  # 14 tokens: 3 full blocks reusable
    first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    second = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == 12
    assert second.usage.computed_prompt_tokens == 2
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    off = make_llm(model_dir, enable_prefix_caching=False)
    off.generate([prompt], SamplingParams(max_tokens=2))
    assert off.generate([prompt], SamplingParams(max_tokens=2))[0].usage.cached_prompt_tokens == 0
    assert_pool_full(llm)


def test_abort_frees_blocks_at_once(model_dir):
    llm = make_llm(model_dir)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], SamplingParams(n=4, max_tokens=100, seed=0))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=100, seed=0))
    for _ in range(3):
        engine.step()
    engine.abort("a")
    engine.abort("b")
    assert_pool_full(llm)


def test_mid_generation_fork_continues_like_parent(model_dir):
    llm = make_llm(model_dir)
    engine = llm.engine
    request = engine.add_request("r", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=16))
    for _ in range(6):
        engine.step()
    parent = request.sequences[0]
    children = engine.fork(parent.seq_id, 3)
    assert all(c.token_ids == parent.token_ids for c in children)
    while engine.has_unfinished:
        engine.step()
    expected = greedy_single(model_dir, PROMPTS[0], 16)
    assert parent.output_token_ids == expected
    assert all(c.output_token_ids == expected for c in children)
    assert_pool_full(llm)


def test_stop_conditions(model_dir):
    llm = make_llm(model_dir)
    base = greedy_single(model_dir, PROMPTS[0], 12)
    stop_id = base[5]
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id])
    )[0].outputs[0]
    first = base.index(stop_id)
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    text = llm.tokenizer.decode(base)
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if needle.strip():
        out = llm.generate(
            [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, stop=[needle])
        )[0].outputs[0]
        assert out.finish_reason == "stop" and needle not in out.text
        assert text.startswith(out.text)
    assert_pool_full(llm)


def test_logprobs_are_reported(model_dir):
    llm = make_llm(model_dir)
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3))
    o = out[0].outputs[0]
    assert len(o.logprobs) == 5 and len(o.top_logprobs) == 5
    for token, lp, top in zip(o.token_ids, o.logprobs, o.top_logprobs, strict=True):
        assert top[0][0] == token  # greedy picks the most likely token
        assert abs(top[0][1] - lp) < 1e-6 and len(top) == 3


def test_prompt_longer_than_context_is_refused(model_dir):
    llm = make_llm(model_dir, max_model_len=16)
    with pytest.raises(ValueError, match="context holds 16"):
        llm.generate([list(range(3, 30))], SamplingParams(max_tokens=2))
    out = llm.generate([list(range(3, 13))], SamplingParams(max_tokens=50, ignore_eos=True))
    assert out[0].outputs[0].finish_reason == "length"
    assert len(out[0].outputs[0].token_ids) == 6  # clipped at the 16-token context
    assert_pool_full(llm)


def test_chat_and_streaming(model_dir):
    llm = make_llm(model_dir)
    messages = [{"role": "user", "content": "The quick brown fox"}]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    full = llm.chat(messages, params)[0].outputs[0].text
    text = llm.tokenizer.apply_chat_template(messages)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    streamed = "".join(o.outputs[0].text_delta for o in llm.stream(ids, params))
    assert streamed == full
    assert_pool_full(llm)


def test_cost_of_shared_prefix_is_charged_once(model_dir):
    """Usage carries the cost model's FLOPs and bytes; a 64-way fork reads its prompt's KV once
    per decode step (cascade attention), and the meter charges exactly that."""
    llm = make_llm(model_dir, block_size=4)
    engine = llm.engine
    prompt = list(range(3, 3 + 21))  # 5 full shared blocks + a partial one
    engine.add_request("r", prompt, SamplingParams(n=64, temperature=1.0, seed=0, max_tokens=3))
    engine.step()  # prefill
    engine.step()  # first decode step of the 64 samples
    # Each sample attends to 22 tokens; 20 of them are in the 5 shared full blocks.
    step = engine.last_step
    assert step.kv_tokens_read == 20 + 64 * 2
    assert (step.kv_tokens_shared, step.shared_groups) == (20, 1)
    while engine.has_unfinished:
        engine.step()
    total = engine.cost_meter.total
    assert total.flops > 0 and total.bytes > 0 and total.measured_time > 0
    assert_pool_full(llm)


def test_usage_reports_cost(model_dir):
    llm = make_llm(model_dir)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    u = out.usage
    c = llm.config
    # Prefill alone: 2 FLOPs per weight per token through the non-head matmuls.
    per_token = (
        2
        * c.num_hidden_layers
        * (
            c.hidden_size * (c.q_size + 2 * c.kv_size)
            + c.q_size * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size
        )
    )
    assert u.flops > per_token * (len(PROMPTS[0]) + 3)
    assert u.bytes > 0 and u.measured_time > 0


def test_forked_samples_have_their_own_text(model_dir):
    """Each sample's text is the decode of its own tokens (forks must not share detokenizer
    state), for forks at prefill (n > 1) and mid-generation."""
    llm = make_llm(model_dir)
    out = llm.generate([PROMPTS[0]], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12))
    for o in out[0].outputs:
        assert o.text == llm.tokenizer.decode(o.token_ids)
    assert len({o.text for o in out[0].outputs}) > 1
    engine = llm.engine
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True)
    request = engine.add_request("r", PROMPTS[1], params)
    for _ in range(4):
        engine.step()
    engine.fork(request.sequences[0].seq_id, 2)
    while engine.has_unfinished:
        engine.step()
    for seq in request.sequences:
        assert seq.detokenizer.text == llm.tokenizer.decode(seq.output_token_ids)
    assert_pool_full(llm)


def test_failed_step_names_its_requests(model_dir, monkeypatch):
    """A step that raises names the requests it was computing; aborting them frees their
    blocks, and a request that was not in the step completes unharmed afterwards."""
    from ttscale.errors import StepError

    llm = make_llm(model_dir, max_num_seqs=2)
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    for rid in ("a", "b", "c"):  # only two fit a step: "c" waits
        engine.add_request(rid, [5, 6, 7], greedy)
    real_execute = engine.executor.execute

    def broken(batch):
        raise FloatingPointError("boom")

    monkeypatch.setattr(engine.executor, "execute", broken)
    with pytest.raises(StepError, match="boom") as e:
        engine.step()
    assert e.value.request_ids == ["a", "b"]
    assert isinstance(e.value.__cause__, FloatingPointError)
    monkeypatch.setattr(engine.executor, "execute", real_execute)
    for rid in e.value.request_ids:
        engine.abort(rid)
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert [o.outputs[0].token_ids for o in outputs if o.finished] == [expected]
    assert_pool_full(llm)


def test_fork_of_unknown_sequence_is_a_clear_error(model_dir):
    llm = make_llm(model_dir)
    with pytest.raises(ValueError, match="cannot fork sequence 12345"):
        llm.engine.fork(12345, 2)
