"""Scorers: judge (P(yes) from logits), reward model (tiny random HF classifier), oracle."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_VOCAB, make_tiny_model, save_tiny_tokenizer
from ttscale import LLM, ModelLoadError, SamplingParams
from ttscale.scorers import JudgeScorer, OracleScorer, ScoreContext
from ttscale.tts.session import Branch, Session, drive


def branch(text: str) -> Branch:
    return Branch(0, None, 0, [], text, text, [-0.5, -1.0], "stop", None)


def run(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path, "llama")
    return LLM(path, kv_cache_gb=0.01, block_size=4)


def test_judge_reads_p_yes_from_logits(llm):
    session = Session(llm.engine, [5, 6, 7])
    ctx = ScoreContext("12 + 30 =", session)
    scores = drive(llm.engine, [JudgeScorer().score(ctx, [branch("42"), branch("41")])])[0]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    # Check one score by hand: P(yes) / (P(yes) + P(no)) over the judge's first-token logprobs.
    tok = llm.tokenizer
    judge = JudgeScorer()
    prompt = tok.encode_chat(
        [{"role": "user", "content": judge.template.format(question="12 + 30 =", solution="42")}]
    )
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0]
    yes, no = judge._answer_ids(llm.engine)
    top = out.outputs[0].top_logprobs[0]
    p_yes = sum(torch.tensor(lp).exp().item() for t, lp in top if t in yes)
    p_no = sum(torch.tensor(lp).exp().item() for t, lp in top if t in no)
    expected = p_yes / (p_yes + p_no) if p_yes + p_no else 0.5
    assert scores[0] == pytest.approx(expected, abs=1e-6)
    assert not llm.engine.requests
    kv = llm.engine.kv_stats()
    assert kv["num_free_blocks"] == kv["num_blocks"]


def make_reward_model(path, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(path), safe_serialization=True)
    save_tiny_tokenizer(path)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_scores(tmp_path, num_labels):
    from ttscale.scorers.reward_model import RewardModelScorer

    make_reward_model(tmp_path, num_labels)
    rm = RewardModelScorer(tmp_path)
    ctx = ScoreContext("12 + 30 =", session=None)  # type: ignore[arg-type]
    texts = [branch("The answer is 42."), branch("Paged KV caches share prefix blocks.")]
    scores = run(rm.score(ctx, texts))
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores == run(rm.score(ctx, texts))  # deterministic
    assert scores[0] != scores[1]
    # Batching must not change scores (padding is masked).
    assert rm.score_texts(["12 + 30 =\n\nThe answer is 42."]) == pytest.approx(scores[:1])


def test_reward_model_refuses_pickles(tmp_path):
    from ttscale.scorers.reward_model import RewardModelScorer

    make_reward_model(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="no safetensors"):
        RewardModelScorer(tmp_path)


def test_oracle():
    oracle = OracleScorer(lambda text: "42" in text)
    assert run(oracle.score(None, [branch("it is 42"), branch("43")])) == [1.0, 0.0]  # type: ignore[arg-type]
