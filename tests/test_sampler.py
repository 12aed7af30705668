"""Sampler: exactness of greedy, truncation sets, penalties, logprobs, batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

from ttscale.sampling import sampler as sampler_mod
from ttscale.sampling.params import SamplingParams
from ttscale.sampling.sampler import Sampler, SampleResult, SamplingRow, make_generator

SAMPLER = Sampler()


def row(
    params: SamplingParams,
    seed: int | None = 0,
    index: int = 0,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    eos: frozenset[int] = frozenset(),
) -> SamplingRow:
    generator = None if params.greedy else make_generator(seed, index)
    return SamplingRow(params, generator, list(prompt), list(output), eos)


def logits_from_probs(probs: list[float], vocab: int, rest: float = 1e-9) -> torch.Tensor:
    """(1, vocab) logits whose softmax is ``probs`` on the first ids, ~0 elsewhere."""
    p = torch.full((vocab,), rest, dtype=torch.float64)
    p[: len(probs)] = torch.tensor(probs, dtype=torch.float64)
    return p.log().float().unsqueeze(0)


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n draws of the same row, batched as n rows with generators (seed, 0..n-1)."""
    rows = [row(params, seed, i) for i in range(n)]
    return SAMPLER(logits.expand(n, -1).contiguous(), rows).token_ids


# ---------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("vocab", [1000, 4096])  # 4096: the blocked argmax
def test_greedy_is_argmax_with_lowest_id_on_ties(vocab: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, vocab)
    logits[3, 700] = logits[3, 10] = logits[3, 900] = 50.0  # tie: the lowest id wins
    logits[4, 65] = logits[4, 64] = 50.0  # tie inside a block
    logits[5] = float("-inf")
    logits[5, 999] = 0.0
    rows = [row(SamplingParams(temperature=0.0)) for _ in range(8)]
    result = SAMPLER(logits, rows)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.token_ids[3:6] == [10, 64, 999]
    assert result.logprobs is None and result.top_logprobs is None


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 3000) * 2
    greedy = SAMPLER(logits, [row(SamplingParams(temperature=0.0)) for _ in range(16)])
    top1 = SAMPLER(logits, [row(SamplingParams(temperature=1.3, top_k=1), 5, i) for i in range(16)])
    assert top1.token_ids == greedy.token_ids


def test_sampled_row_without_generator_is_rejected() -> None:
    bad = SamplingRow(SamplingParams(temperature=1.0), None, [], [])
    with pytest.raises(ValueError, match="generator"):
        SAMPLER(torch.zeros(1, 10), [bad])


# ---------------------------------------------------------------------------- determinism


def test_make_generator_is_deterministic_per_seed_and_index() -> None:
    def first(seed: int, index: int) -> list[float]:
        return torch.rand(4, generator=make_generator(seed, index)).tolist()

    assert first(7, 0) == first(7, 0)
    assert first(7, 1) == first(7, 1)
    assert first(7, 0) != first(7, 1)
    assert first(7, 0) != first(8, 0)
    assert first(-3, 2) == first(-3, 2)
    r = torch.rand(4, generator=make_generator(None)).tolist()
    assert r != torch.rand(4, generator=make_generator(None)).tolist()


INVARIANCE_PARAMS = [
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.7, top_p=0.9, seed=11),
    SamplingParams(temperature=1.0, top_p=0.3, seed=11),
    SamplingParams(temperature=0.9, top_k=40, seed=11),
    SamplingParams(temperature=1.0, min_p=0.05, seed=11),
    SamplingParams(temperature=0.8, top_k=100, top_p=0.8, min_p=0.02, seed=11),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.4, seed=11),
]


@pytest.mark.parametrize(
    ("params", "vocab"),
    [(p, 3000) for p in INVARIANCE_PARAMS]
    # 16384: the blocked argmax (greedy neighbours) and blocked top-k candidate search
    + [(INVARIANCE_PARAMS[3], 16384), (INVARIANCE_PARAMS[5], 16384)],
    ids=lambda p: repr(p)[:60],
)
def test_seeded_row_is_independent_of_batch(params: SamplingParams, vocab: int) -> None:
    """Same seed, same logits: identical tokens alone and amid random other rows."""
    steps = 40
    torch.manual_seed(2)
    own = torch.randn(steps, vocab) * 2.5  # the row's logits at each step
    others_params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2, top_p=0.5),
        SamplingParams(temperature=0.6, top_k=5),
        SamplingParams(temperature=1.0, min_p=0.2, presence_penalty=1.0),
        SamplingParams(temperature=1.0),
    ]

    def run(batched: bool) -> list[int]:
        gen = make_generator(params.seed, 3)
        other_gens = [make_generator(100 + j) for j in range(8)]
        rng = torch.Generator().manual_seed(99)
        out: list[int] = []
        for step in range(steps):
            me = SamplingRow(params, gen, [5, 6, 7], list(out))
            if not batched:
                result = SAMPLER(own[step : step + 1], [me])
                out.append(result.token_ids[0])
                continue
            n_other = int(torch.randint(1, 8, (1,), generator=rng))
            pos = int(torch.randint(0, n_other + 1, (1,), generator=rng))
            batch_rows = [
                SamplingRow(others_params[(step + j) % 5], other_gens[j], [1], [2, 3])
                for j in range(n_other)
            ]
            batch_rows.insert(pos, me)
            logits = torch.randn(n_other + 1, vocab, generator=rng) * 3
            logits[pos] = own[step]
            out.append(SAMPLER(logits, batch_rows).token_ids[pos])
        return out

    alone = run(batched=False)
    assert run(batched=False) == alone  # reproducible
    assert run(batched=True) == alone  # batch-invariant
    assert len(set(alone)) > 1


# ---------------------------------------------------------------------------- truncation

# Probabilities by rank: 0.4 (id 1), 0.3 (id 3), 0.2 (id 4), then 0.05 twice (ids 0 and 2, an
# exact tie), then ~1e-9 for each of the other ids of a 5000-token vocabulary.
HEAD = [0.05, 0.4, 0.05, 0.3, 0.2]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_p=0.85), {1, 3, 4}),  # 0.4 + 0.3 < 0.85 <= 0.4 + 0.3 + 0.2
        (SamplingParams(top_p=0.65), {1, 3}),
        (SamplingParams(top_p=0.1), {1}),
        (SamplingParams(top_k=2), {1, 3}),
        (SamplingParams(top_k=3), {1, 3, 4}),
        (SamplingParams(top_k=4), {0, 1, 2, 3, 4}),  # both tokens tied at the 4th value
        (SamplingParams(min_p=0.6), {1, 3}),  # p >= 0.24
        (SamplingParams(min_p=0.3), {1, 3, 4}),  # p >= 0.12
        # top-p on the renormalised top-k mass: 0.4/0.9 + 0.3/0.9 >= 0.75 (0.4 + 0.3 is not)
        (SamplingParams(top_k=3, top_p=0.75), {1, 3}),
        # top-p before min-p: the nucleus of the full distribution is {1, 3, 4}
        (SamplingParams(top_p=0.75, min_p=0.3), {1, 3, 4}),
        (SamplingParams(top_p=0.95, min_p=0.6), {1, 3}),
        (SamplingParams(top_k=4, min_p=0.6), {1, 3}),
    ],
)
def test_truncation_never_samples_masked_tokens(params: SamplingParams, allowed: set[int]) -> None:
    logits = logits_from_probs(HEAD, 20000)  # large enough for the blocked top-k search
    drawn = draw_many(logits, params, 400)
    assert set(drawn) == allowed


def test_top_p_keeps_ties_at_the_cutoff_in_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = logits_from_probs([0.1, 0.3, 0.3, 0.3], 600)
    params = SamplingParams(top_p=0.5)  # cut at a 0.3: every token tied with it is kept
    assert set(draw_many(logits, params, 600)) == {1, 2, 3}
    monkeypatch.setattr(sampler_mod, "_MAX_ATTEMPTS", 0)  # straight to the sorting path
    assert set(draw_many(logits, params, 600)) == {1, 2, 3}


def nucleus_of(logits: torch.Tensor, top_p: float) -> set[int]:
    """Reference nucleus: sort, float64 cumsum, keep every p >= the cut-off value."""
    probs = torch.softmax(logits[0], dim=-1)
    values, _ = probs.sort(descending=True)
    cut = int(torch.searchsorted(values.double().cumsum(0), torch.tensor([top_p]).double()))
    return set((probs >= values[cut]).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("scale", "top_p"),
    [
        (0.5, 0.05),  # ~100-token nucleus: 1024 candidates hold it
        (0.1, 0.4),  # ~1600-token nucleus: needs the whole sorted row
    ],
)
def test_diffuse_top_p_falls_back_exactly(scale: float, top_p: float) -> None:
    """Low nucleus mass: many rows exhaust the rejection draws and take the exact path."""
    torch.manual_seed(3)
    logits = torch.randn(1, 4096) * scale
    nucleus = nucleus_of(logits, top_p)
    drawn = draw_many(logits, SamplingParams(top_p=top_p), 600)
    assert set(drawn) <= nucleus
    assert len(set(drawn)) > min(0.5 * len(nucleus), 400)


def test_top_k_tie_straddling_a_candidate_tier_keeps_all_ties() -> None:
    logits = torch.full((1, 2000), -5.0)
    logits[0, 500:600] = 3.0  # 100 tied maxima; top_k=50 is first tried with 64 candidates
    drawn = draw_many(logits, SamplingParams(top_k=50), 2000)
    assert set(drawn) <= set(range(500, 600))
    assert len(set(drawn)) > 90


def test_top_candidates_match_topk_values() -> None:
    torch.manual_seed(8)
    probs = torch.softmax(torch.randn(5, 49152) * 3, dim=-1)
    probs[2, 1000:1100] = probs[2].max()  # many ties spread over blocks
    for size in (64, 256):
        values, ids = sampler_mod._top_candidates(probs, size)
        assert torch.equal(values, probs.topk(size, dim=-1).values)
        assert torch.equal(probs.gather(1, ids), values)
        assert all(len(set(r)) == size for r in ids.tolist())


def test_min_p_keeps_ties_with_the_cutoff() -> None:
    logits = torch.full((1, 3000), -4.0)
    logits[0, [7, 1500, 2999]] = 2.0
    assert set(draw_many(logits, SamplingParams(min_p=1.0), 300)) == {7, 1500, 2999}


def test_vocab_not_a_multiple_of_the_block_never_draws_padding() -> None:
    logits = torch.zeros(1, 300)
    logits[0, 299] = 2.0
    drawn = draw_many(logits, SamplingParams(top_p=0.9), 500)
    assert max(drawn) < 300 and 299 in drawn


# ---------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_frequencies_match_softmax(temperature: float) -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 50) * 1.5
    n = 20000
    drawn = torch.tensor(draw_many(logits, SamplingParams(temperature=temperature), n, seed=5))
    freq = torch.bincount(drawn, minlength=50).double() / n
    expected = torch.softmax(logits[0].double() / temperature, dim=-1)
    # Binomial std of a frequency is <= 0.0036 here; 5 sigma, loose but catches any bias.
    assert (freq - expected).abs().max().item() < 0.018
    assert 0.5 * (freq - expected).abs().sum().item() < 0.03


def test_top_p_frequencies_match_renormalised_nucleus() -> None:
    logits = logits_from_probs(HEAD, 1000)
    n = 6000
    drawn = torch.tensor(draw_many(logits, SamplingParams(top_p=0.85), n, seed=6))
    freq = torch.bincount(drawn, minlength=5).double()[:5] / n
    expected = torch.tensor([0, 0.4, 0, 0.3, 0.2], dtype=torch.float64) / 0.9
    assert (freq - expected).abs().max().item() < 0.03


# ---------------------------------------------------------------------------- penalties, masks


def test_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    params = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    r = row(params, prompt=(0,), output=(1, 1, 2))
    out = SAMPLER.process_logits(logits, [r])
    # rep: 0 (prompt) 2/2; 1 -1*2; 2 0.5/2; 3, 4 untouched. Then output counts 1:2, 2:1.
    expected = torch.tensor([[1.0, -2.0 - 0.5 * 2 - 0.25, 0.25 - 0.5 * 1 - 0.25, 3.0, -0.5]])
    assert torch.allclose(out, expected), out  # (torch.testing takes 1 s to import)
    assert logits[0, 0].item() == 2.0  # the input is not modified
    as_tensors = SamplingRow(params, None, torch.tensor([0]), torch.tensor([1, 1, 2]))
    assert torch.equal(SAMPLER.process_logits(logits, [as_tensors]), out)


def test_neutral_rows_are_not_copied_or_changed() -> None:
    logits = torch.randn(3, 40)
    rows = [row(SamplingParams(), output=(1, 2)) for _ in range(3)]
    assert SAMPLER.process_logits(logits, rows) is logits


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, 20)
    logits[0, 7] = 10.0  # EOS
    logits[0, 9] = 9.0  # a stop token id
    eos = frozenset({7})
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(9,))

    def pick(n_out: int, p: SamplingParams = params) -> int:
        return SAMPLER(logits, [row(p, output=(1,) * n_out, eos=eos)]).token_ids[0]

    assert pick(0) not in (7, 9)
    assert pick(2) not in (7, 9)
    assert pick(3) == 7
    # ignore_eos does not change sampling (the engine just does not stop on EOS).
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(9,), ignore_eos=True)
    assert pick(1, ignoring) not in (7, 9)
    assert pick(3, ignoring) == 7
    # A forked step counts min_tokens from its own start.
    forked = SamplingRow(params, None, [], [1] * 10, eos, step_tokens=1)
    assert SAMPLER(logits, [forked]).token_ids[0] not in (7, 9)


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_distribution() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 4096)
    rows = [
        row(
            SamplingParams(temperature=0.5, top_k=10, logprobs=5, repetition_penalty=1.5),
            1,
            prompt=(1, 2),
            output=(3,),
        ),
        row(SamplingParams(temperature=0.0)),  # asks for nothing
        row(SamplingParams(temperature=0.0, logprobs=0)),
    ]
    result: SampleResult = SAMPLER(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs is not None and result.top_logprobs is not None
    for i in (0, 2):
        assert result.logprobs[i] == pytest.approx(raw[i, result.token_ids[i]].item(), abs=1e-6)
    assert math.isnan(result.logprobs[1])
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []
    top = result.top_logprobs[0]
    assert len(top) == 5
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    best = raw[0].topk(5)
    assert [t for t, _ in top] == best.indices.tolist()
    assert torch.allclose(torch.tensor(values), best.values)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_impossible_sampling_parameter_names_its_field(kwargs, field) -> None:
    from ttscale.errors import SamplingParamsError

    with pytest.raises(SamplingParamsError, match=f"invalid sampling parameter {field}=") as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and isinstance(e.value, ValueError)
