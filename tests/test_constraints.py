"""Constrained decoding: the sampler's mask hook, the engine's per-sequence grammar state
(forks clone it), and xgrammar grammars end to end on a tiny random model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import assert_pool_full
from ttscale.errors import SamplingParamsError
from ttscale.sampling.constraints import (
    ConstraintError,
    GrammarCompiler,
    apply_bitmask,
    apply_bitmask_torch,
    bitmask_words,
    unpack_bitmask,
)
from ttscale.sampling.params import SamplingParams
from ttscale.sampling.sampler import Sampler, SamplingRow, make_generator


class Allowed:
    """A toy constraint: the i-th token must be in ``steps[i]``; done after the last step."""

    def __init__(self, steps: list[set[int]], log: list[int] | None = None) -> None:
        self.steps, self.pos, self.log = steps, 0, log if log is not None else []

    def start(self) -> Allowed:
        return Allowed(self.steps, self.log)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for t in self.steps[self.pos]:
            word, bit = divmod(t, 32)
            value = int(bitmask[row, word]) & 0xFFFFFFFF | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value

    def advance(self, token_id: int) -> bool:
        if token_id not in self.steps[self.pos]:
            raise ValueError(f"token {token_id} not allowed")
        self.log.append(token_id)
        self.pos += 1
        return self.pos == len(self.steps)

    def fork(self) -> Allowed:
        child = Allowed(self.steps, self.log)
        child.pos = self.pos
        return child


def test_bitmask_unpacks_every_bit_including_the_sign_bit() -> None:
    vocab = 70
    toy = Allowed([{0, 31, 32, 63, 69}])
    mask = torch.zeros(1, bitmask_words(vocab), dtype=torch.int32)
    toy.fill_bitmask(mask, 0)
    assert unpack_bitmask(mask, vocab)[0].nonzero().flatten().tolist() == [0, 31, 32, 63, 69]


def test_xgrammar_kernel_equals_the_torch_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, bitmask_words(1000)), dtype=torch.int32)
    fast, ref = logits.clone(), logits.clone()
    apply_bitmask(fast, bitmask, [0, 2, 3])
    apply_bitmask_torch(ref, bitmask, [0, 2, 3])
    assert torch.equal(fast, ref)
    assert torch.equal(fast[[1, 4]], logits[[1, 4]])  # rows not listed are untouched
    assert torch.isinf(fast[0]).sum() == (~unpack_bitmask(bitmask[:1], 1000)).sum()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_draws_only_allowed_tokens(temperature: float) -> None:
    vocab, allowed = 300, {5, 77, 250}
    sampler = Sampler()
    params = SamplingParams(temperature=temperature)
    logits = torch.randn(32, vocab)
    logits[:, 7] = 50.0  # the unconstrained favourite is forbidden
    rows = [
        SamplingRow(
            params,
            None if params.greedy else make_generator(0, i),
            [],
            [],
            constraint=Allowed([allowed]),
        )
        for i in range(32)
    ]
    tokens = sampler(logits, rows).token_ids
    assert set(tokens) <= allowed
    if temperature == 0:
        best = max(allowed, key=lambda t: float(logits[0, t]))
        assert tokens[0] == best


def test_a_grammar_that_allows_nothing_ends_its_sample_and_spares_the_batch() -> None:
    vocab = 100
    params = SamplingParams(temperature=1.0)
    rows = [
        SamplingRow(
            params, make_generator(0, 0), [], [], frozenset({7}), constraint=Allowed([set()])
        ),
        SamplingRow(
            params, make_generator(0, 1), [], [], frozenset({7}), constraint=Allowed([{3}])
        ),
    ]
    assert Sampler()(torch.randn(2, vocab), rows).token_ids == [7, 3]


def test_rows_without_constraint_are_untouched() -> None:
    logits = torch.randn(2, 64)
    rows = [SamplingRow(SamplingParams(temperature=0), None, [], [])] * 2
    assert Sampler().process_logits(logits, rows) is logits


def test_min_tokens_is_refused_with_a_constraint() -> None:
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(min_tokens=2, constraint=Allowed([{1}]))


def test_engine_advances_each_sample_and_forks_clone_the_state(llm) -> None:
    # n=3 samples fork the request's one state before the first token; each advances on
    # its own, and the grammar's end finishes the sample even with ignore_eos.
    steps = [{10, 11, 12}, {20, 21}, {30}]
    log: list[int] = []
    params = SamplingParams(
        n=3, temperature=1.0, seed=0, max_tokens=10, ignore_eos=True, constraint=Allowed(steps, log)
    )
    (out,) = llm.generate([[1, 2, 3]], params)
    for o in out.outputs:
        assert [t in s for t, s in zip(o.token_ids, steps, strict=True)] == [True] * 3
        assert o.finish_reason == "stop"
    assert len(log) == 9
    assert_pool_full(llm)


@pytest.fixture(scope="module")
def compiler(llm) -> GrammarCompiler:
    return GrammarCompiler(llm.tokenizer, llm.engine.model_config.vocab_size)


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "blue"]}},
    "required": ["ok", "colour"],
}


def test_json_schema_samples_are_valid_and_follow_the_schema(llm, compiler) -> None:
    params = SamplingParams(
        n=4, temperature=3.0, seed=1, max_tokens=40, constraint=compiler.json_schema(SCHEMA)
    )
    (out,) = llm.generate([[1, 2, 3]], params)
    for o in out.outputs:
        value = json.loads(o.text)
        assert list(value) == ["ok", "colour"]  # the schema's order, nothing more (strict)
        assert isinstance(value["ok"], bool) and value["colour"] in ("red", "blue")
        assert o.finish_reason == "stop"
    assert_pool_full(llm)


def test_regex_choice_and_ebnf(llm, compiler) -> None:
    cases = [
        (compiler.regex(r"Answer: -?[0-9]{1,3}"), r"Answer: -?[0-9]{1,3}"),
        (compiler.choice(['say "hi"', "no", "naïve"]), r'say "hi"|no|naïve'),
        (compiler.ebnf('root ::= "x" [0-9] [0-9]?'), r"x[0-9][0-9]?"),
    ]
    for grammar, pattern in cases:
        params = SamplingParams(n=3, temperature=5.0, seed=2, max_tokens=20, constraint=grammar)
        (out,) = llm.generate([[4, 5]], params)
        for o in out.outputs:
            assert re.fullmatch(pattern, o.text), (pattern, o.text)


def test_a_search_step_forked_with_a_grammar_follows_it(llm, compiler) -> None:
    # A strategy's final step: free text first, then a fork whose params bring the grammar.
    engine = llm.engine
    req = engine.add_request(
        "free", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3), retain=True
    )
    while engine.has_unfinished:
        engine.step()
    final = SamplingParams(temperature=0, max_tokens=12, constraint=compiler.regex(r"A: [0-9]+\."))
    (child,) = engine.fork(req.sequences[0].seq_id, 1, final)
    while engine.has_unfinished:
        engine.step()
    assert re.fullmatch(r"A: [0-9]+\.", child.detokenizer.text), child.detokenizer.text
    engine.release("free")
    assert_pool_full(llm)


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda c: c.regex("("), "regex"),
        (lambda c: c.json_schema('{"type": 5}'), "json_schema"),
        (lambda c: c.json_schema("{not json"), "not valid JSON"),
        (lambda c: c.ebnf("root ::= undefined_rule"), "grammar"),
        (lambda c: c.choice([]), "choices"),
        (lambda c: c.regex("a" * 70_000), "at most"),
        (lambda c: c.ebnf("root ::= root"), "matches no string"),
        # Compile time: bounded repetitions and schema nesting are capped.
        (lambda c: c.regex(r"[\s\S]{1,1000}"), "repetition bounds"),
        (lambda c: c.json_schema({"type": "string", "pattern": "a{300}"}), "schema pattern"),
        (lambda c: c.json_schema(nested_schema(60)), "nests deeper"),
    ],
)
def test_bad_grammars_are_one_line_errors(compiler, build, message) -> None:
    with pytest.raises(ConstraintError, match=message) as e:
        build(compiler)
    assert "\n" not in str(e.value)
