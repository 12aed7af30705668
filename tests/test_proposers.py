"""Prompt-lookup speculation: the proposer's lookups, greedy output identical to plain
decoding with fewer steps where the text repeats, and T > 0 keeping the target distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from ttscale.engine.proposers import PromptLookupProposer, make_proposer, speculation_stats
from ttscale.sampling.params import SamplingParams


def test_lookup_takes_the_latest_match_of_the_longest_suffix() -> None:
    proposer = PromptLookupProposer(k=3, ngram=3, min_ngram=1)
    #         0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 1, 2, 5, 6, 7, 3, 4, 5, 6, 7]
    assert proposer.propose(0, tokens) == [3, 4, 5]  # latest [5 6 7] is at 5, then 3 4 5
    assert proposer.propose(0, [9, 8, 1, 2, 9, 7, 3, 8]) == [1, 2, 9]  # only [8] matches
    assert proposer.propose(0, [1, 2, 3]) == []
    assert proposer.propose(0, [4]) == []
    assert PromptLookupProposer(k=2, ngram=2).propose(0, [1, 2, 7, 1, 2]) == [7, 1]
    assert PromptLookupProposer(k=2).propose(0, [9, 8, 1, 2, 9, 7, 3, 8]) == []  # min 2


def test_lookup_matches_whole_tokens_only() -> None:
    """The search runs on bytes: a hit straddling two tokens' bytes must not count."""
    # 256 = 00 01 00 00 and 1 = 01 00 00 00 (little-endian): [256, 1]'s bytes contain
    # 01 00 00 00 at offset 1, which is not a token boundary.
    proposer = PromptLookupProposer(k=2, ngram=1, min_ngram=1)
    assert proposer.propose(0, [256, 7, 1]) == []
    assert proposer.propose(0, [1, 42, 256, 7, 1]) == [42, 256]
    assert proposer.propose(0, [70000, 3, 4, 70000]) == [3, 4]


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        PromptLookupProposer(k=0)
    with pytest.raises(ValueError, match="need 1 <= min_ngram <= ngram"):
        PromptLookupProposer(ngram=1)
    with pytest.raises(ValueError, match="speculative must be one of prompt_lookup"):
        make_proposer("medusa", 4)


def _llm(model_dir: Path, **options):
    from ttscale.llm import LLM

    return LLM(model_dir, kv_cache_gb=0.01, block_size=4, **options)


# Text that repeats: the tiny random model falls into loops the lookup then predicts.
_COPY_PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6, 7],
    list(range(40, 72)) + list(range(40, 50)),
    [3, 1, 4, 1, 5, 9, 2, 6],
]


def test_greedy_identical_and_fewer_steps(model_dir: Path) -> None:
    plain = _llm(model_dir)
    spec = _llm(model_dir, speculative="prompt_lookup", num_speculative_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    for prompt in _COPY_PROMPTS:
        ours = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        ref = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert ours == ref
    # Several requests and n > 1 at once: still identical.
    batch = SamplingParams(temperature=0, max_tokens=32, n=3, ignore_eos=True)
    ours = spec.generate(_COPY_PROMPTS, batch, use_tqdm=False)
    ref = plain.generate(_COPY_PROMPTS, batch, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in ours] == [
        [c.token_ids for c in o.outputs] for o in ref
    ]
    spec.engine.check_integrity()
    assert spec.engine.kv_stats()["num_used_blocks"] == 0


_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
    "a single step. All that glitters is not gold."
)


def test_copying_takes_fewer_steps_with_the_same_tokens() -> None:
    """The embedded model asked to repeat a text: same greedy tokens in far fewer steps.
    Pinned to dequantized fp32: with quantized weights the kernels take bf16 activations,
    which turns the last-bit differences between a 1-row decode step and a (1 + k)-row
    verification step into bf16-level ones, so near-ties may break differently."""
    from ttscale.llm import LLM

    messages = [{"role": "user", "content": f"Repeat this text exactly:\n\n{_TEXT}"}]
    params = SamplingParams(temperature=0, max_tokens=40)
    outputs, steps = [], []
    for options in ({}, {"speculative": "prompt_lookup", "num_speculative_tokens": 5}):
        llm = LLM(kv_cache_gb=0.05, quantize="none", **options)
        outputs.append(llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids)
        steps.append(llm.engine.stats["steps"])
    assert outputs[0] == outputs[1]
    assert steps[1] < 0.6 * steps[0]
    summary = speculation_stats(llm.engine.stats)
    assert 0.5 < summary["acceptance_rate"] <= 1 and summary["tokens_per_step"] > 2


class _FixedProposer:
    """Always drafts the same tokens: deterministic, so acceptance must be exact."""

    def __init__(self, drafts: list[int]) -> None:
        self.drafts = drafts

    def propose(self, seq_id: int, token_ids) -> list[int]:
        return list(self.drafts)


def test_sampling_keeps_the_target_distribution(model_dir: Path) -> None:
    """T = 1 over the top 3 tokens: (first, second) token pairs from 3000 speculative samples
    against the model's own joint probabilities (9 cells, chi-square, p > 0.001). The
    second token is the one verified against drafts; one draft is a likely token."""
    prompt = [11, 22, 33, 44]
    plain = _llm(model_dir, max_num_seqs=512)
    layers = plain.config.num_hidden_layers

    def top3(ids: list[int]) -> tuple[list[int], torch.Tensor]:
        hidden = plain.hidden_states([ids], [layers], start=len(ids) - 1)[0][:, 0]
        logits = plain.engine.model.compute_logits(hidden)[0]
        values, tokens = logits.topk(3)
        return tokens.tolist(), torch.softmax(values.double(), dim=0)

    firsts, p_first = top3(prompt)
    expected = {}
    for t1, p1 in zip(firsts, p_first.tolist(), strict=True):
        seconds, p_second = top3([*prompt, t1])
        for t2, p2 in zip(seconds, p_second.tolist(), strict=True):
            expected[(t1, t2)] = p1 * p2
    likely = max(expected, key=expected.get)[1]

    spec = _llm(model_dir, max_num_seqs=512, proposer=_FixedProposer([likely, likely]))
    n = 3000
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=2, n=n, seed=1, ignore_eos=True)
    out = spec.generate(prompt, params, use_tqdm=False)[0]
    assert spec.engine.stats["draft_steps"] > 0
    counts = dict.fromkeys(expected, 0)
    for completion in out.outputs:
        counts[tuple(completion.token_ids)] += 1
    observed = np.array([counts[c] for c in expected])
    probs = np.array([expected[c] for c in expected])
    assert observed.sum() == n
    assert chisquare(observed, probs / probs.sum() * n).pvalue > 1e-3


# ---- a draft model: the target with layers skipped (self-speculation), or a smaller model ----


def test_self_speculation_greedy_identical_with_samples_and_forks(model_dir: Path) -> None:
    """The tiny model's first layer drafts (few drafts survive: the test is that the output
    is the target's anyway), for several requests with n = 3 and for forks mid-generation."""
    plain = _llm(model_dir)
    spec = _llm(model_dir, speculative="self", draft_layers=1, num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=24, n=3, ignore_eos=True)
    ours = spec.generate(_COPY_PROMPTS, params, use_tqdm=False)
    ref = plain.generate(_COPY_PROMPTS, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in ours] == [
        [c.token_ids for c in o.outputs] for o in ref
    ]
    assert sum(o.usage.draft_tokens for o in ours) > 0
    # Forks: a retained greedy request, forked twice after it finished, continues exactly as
    # a plain engine's fork does.
    branches = []
    for llm in (spec, plain):
        engine = llm.engine
        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        request = engine.add_request("r", _COPY_PROMPTS[0], greedy, retain=True)
        while not request.finished:
            engine.step()
        more = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        children = engine.fork(request.sequences[0].seq_id, 2, more)
        while engine.has_unfinished:
            engine.step()
        branches.append([c.token_ids for c in children])
        engine.release("r")
        engine.check_integrity()
    assert branches[0] == branches[1]
    assert spec.engine.kv_stats()["num_used_blocks"] == 0


def test_draft_usage_and_the_per_request_switch(model_dir: Path) -> None:
    """A draft with every layer is the target itself: every draft is kept, k + 1 tokens per
    step. A request with speculative=False gets no drafts beside one that does."""
    spec = _llm(model_dir, speculative="self", draft_layers=[0, 1], num_speculative_tokens=3)
    on = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)
    off = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, speculative=False)
    with_drafts, without = spec.generate([_COPY_PROMPTS[2], _COPY_PROMPTS[2]], [on, off], False)
    assert with_drafts.outputs[0].token_ids == without.outputs[0].token_ids
    usage = with_drafts.usage
    assert usage.draft_tokens == usage.accepted_draft_tokens > 0
    assert usage.acceptance_rate == 1.0 and usage.tokens_per_step == 4.0  # 1 + k
    assert without.usage.draft_tokens == 0 and without.usage.acceptance_rate is None
    stats = spec.engine.speculation_stats()
    assert stats["acceptance_rate"] == 1.0 and stats["draft_tokens"] == usage.draft_tokens
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="no")  # type: ignore[arg-type]


def test_draft_model_sharing_the_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    """A smaller random model with the same tokenizer drafts; the output is the target's."""
    from tests.conftest import make_tiny_model

    draft_dir = tmp_path / "draft"
    make_tiny_model(draft_dir, seed=1, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    plain = _llm(model_dir)
    spec = _llm(model_dir, speculative="draft", draft_model=draft_dir, num_speculative_tokens=2)
    params = SamplingParams(temperature=0, max_tokens=20, n=2, ignore_eos=True)
    ours = spec.generate(_COPY_PROMPTS, params, use_tqdm=False)
    ref = plain.generate(_COPY_PROMPTS, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in ours] == [
        [c.token_ids for c in o.outputs] for o in ref
    ]
    assert spec.engine.speculation_stats()["draft_tokens"] > 0


def test_bad_draft_options(model_dir: Path, tmp_path: Path) -> None:
    import json

    from ttscale.errors import ModelLoadError

    with pytest.raises(ValueError, match="needs draft_model"):
        _llm(model_dir, speculative="draft")
    with pytest.raises(ValueError, match="draft_layers is for speculative='self'"):
        _llm(model_dir, speculative="prompt_lookup", draft_layers=1)
    with pytest.raises(ValueError, match=r"draft_layers must be in \[1, 2\)"):
        _llm(model_dir, speculative="self", draft_layers=2)
    with pytest.raises(ValueError, match="increasing, distinct"):
        _llm(model_dir, speculative="self", draft_layers=[1, 0])
    # Same files, two tokens' ids swapped in the tokenizer: refused at load.
    other = tmp_path / "other"
    other.mkdir()
    for f in model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelLoadError, match="another tokenizer than the target"):
        _llm(model_dir, speculative="draft", draft_model=other)


def test_server_metrics_report_speculation(model_dir: Path) -> None:
    pytest.importorskip("prometheus_client")
    from ttscale.server.engine_loop import EngineLoop
    from ttscale.server.metrics import ServerMetrics

    spec = _llm(model_dir, speculative="self", draft_layers=[0, 1], num_speculative_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    spec.generate([_COPY_PROMPTS[2]], params, use_tqdm=False)
    metrics = ServerMetrics()
    EngineLoop(spec.engine, metrics)  # publishes the engine's state once at start
    text = metrics.render().decode()
    assert "ttscale_spec_decode_acceptance_rate 1.0" in text
    assert "ttscale_spec_decode_tokens_per_step 4.0" in text
