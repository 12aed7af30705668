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
