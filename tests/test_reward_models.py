"""Reward models on our engine: parity with transformers (tiny random RMs made here), the
Qwen PRM's step convention, prefix sharing between branches, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.conftest import (
    CHAT_TEMPLATE,
    TINY_DIMS,
    TINY_VOCAB,
    make_tiny_model,
    save_tiny_tokenizer,
)
from ttscale import LLM, ModelLoadError
from ttscale.kvcache import CacheConfig
from ttscale.loader import load_checkpoint
from ttscale.models.registry import build_model
from ttscale.models.reward import PRM_STEP_TOKEN, RewardModelConfig
from ttscale.scorers import ScoreContext, aggregate, load_scorer
from ttscale.scorers.reward_model import QWEN_MATH_SYSTEM, RewardModelScorer
from ttscale.tts.session import Branch

QUESTION = "Paged KV caches share prefix blocks between forked sequences. 12 + 30 ="
SMALL = CacheConfig(kv_cache_gb=0.01, block_size=4)
PRM_VOCAB = TINY_VOCAB + 8  # room for <extra_0>


def branch(text: str, parent: Branch | None = None) -> Branch:
    full = (parent.text if parent else "") + text
    depth = parent.depth + 1 if parent else 0
    return Branch(0, parent, depth, [], full, text, [], "stop", None)


def run(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def tiny_config(cls_name: str, **overrides):
    import transformers

    kwargs = dict(TINY_DIMS, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def randomize(module: nn.Module, seed: int) -> None:
    """HF inits norms to 1 and biases to 0: perturb them so the parity tests see them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def make_sequence_classifier(path, family: str = "Llama", num_labels: int = 1, seed: int = 0):
    """transformers' own *ForSequenceClassification, saved as a folder."""
    import transformers

    config = tiny_config(f"{family}Config", num_labels=num_labels)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForSequenceClassification")(config).eval()
    randomize(model, seed)
    model.save_pretrained(str(path), safe_serialization=True)
    save_tiny_tokenizer(path)
    return model


class QwenRemoteRM(nn.Module):
    """The reference: transformers' Qwen2Model + the head of Qwen's remote code
    (modeling_qwen2_rm.py): score = Sequential(Linear(h, h), ReLU, Linear(h, num_labels))."""

    def __init__(self, config, num_labels: int) -> None:
        super().__init__()
        from transformers import Qwen2Model

        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, num_labels))

    @torch.no_grad()
    def forward(self, input_ids: list[int]) -> torch.Tensor:
        """(T,) ids -> (T, num_labels) fp32 logits at every position."""
        hidden = self.model(input_ids=torch.tensor([input_ids])).last_hidden_state[0]
        return self.score(hidden).float()


def make_qwen_remote(path, architecture: str, seed: int = 0, lm_head: bool = False):
    num_labels = 2 if architecture == "Qwen2ForProcessRewardModel" else 1
    vocab = PRM_VOCAB if num_labels == 2 else TINY_VOCAB
    config = tiny_config("Qwen2Config", vocab_size=vocab, pad_token_id=None)
    torch.manual_seed(seed)
    ref = QwenRemoteRM(config, num_labels).eval()
    randomize(ref, seed)
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if lm_head:  # some RM exports keep their policy's head: it must be ignored
        tensors["lm_head.weight"] = torch.randn(vocab, config.hidden_size)
    save_file(tensors, str(path / "model.safetensors"))
    config.architectures = [architecture]
    config.save_pretrained(str(path))
    if num_labels == 2:
        save_prm_tokenizer(path)
    else:
        save_tiny_tokenizer(path)
    return ref


def save_prm_tokenizer(path) -> None:
    """The tiny tokenizer plus the PRM's `<extra_0>` special token (a copy: the shared one is
    cached by conftest)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import _tiny_tokenizer_object

    tok = Tokenizer.from_str(_tiny_tokenizer_object().to_str())
    tok.add_special_tokens([PRM_STEP_TOKEN])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(path))


def hf_prob(logits: torch.Tensor) -> torch.Tensor:
    return logits[..., 0].sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)[..., -1]


TEXTS = ["The answer is 42.", "Test-time scaling: 12 + 30 = 41, so 41.", "naïve 🙂 fox"]


# ---- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "num_labels"), [("Llama", 1), ("Llama", 2), ("Qwen2", 1), ("Qwen2", 3)]
)
def test_sequence_classifier_parity(tmp_path, family, num_labels):
    from transformers import PreTrainedTokenizerFast

    hf = make_sequence_classifier(tmp_path, family, num_labels)
    rm = RewardModelScorer(tmp_path, cache_config=SMALL)
    assert type(rm.model).__name__ == f"{family}ForSequenceClassification"
    scores = run(rm.score(ScoreContext(QUESTION, None), [branch(t) for t in TEXTS]))  # type: ignore[arg-type]
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text, score in zip(TEXTS, scores, strict=True):
        ids = hf_tok(f"{QUESTION}\n\n{text}").input_ids  # today's text format, HF's tokens
        assert rm.encode(QUESTION, text) == ids
        with torch.no_grad():
            expected = hf_prob(hf(torch.tensor([ids])).logits.float())[0].item()
        assert 0.0 <= score <= 1.0
        assert score == pytest.approx(expected, abs=1e-4)
    rm.engine.check_integrity()


def test_sequence_classifier_reads_last_non_pad_token(tmp_path):
    """transformers pools at the rightmost non-pad token: trailing pad ids are skipped."""
    hf = make_sequence_classifier(tmp_path, "Llama", 1)
    rm = RewardModelScorer(tmp_path, cache_config=SMALL)
    ids = [5, 9, 17, 33, 0, 0]  # pad_token_id = 0
    with torch.no_grad():
        expected = hf_prob(hf(torch.tensor([ids])).logits.float())[0].item()
    assert rm.score_ids([ids])[0] == pytest.approx(expected, abs=1e-4)
    assert rm.score_ids([ids])[0] == pytest.approx(rm.score_ids([ids[:4]])[0], abs=1e-6)


def test_qwen_outcome_rm_parity(tmp_path):
    ref = make_qwen_remote(tmp_path, "Qwen2ForRewardModel", lm_head=True)
    rm = RewardModelScorer(tmp_path, cache_config=SMALL)
    scores = run(rm.score(ScoreContext(QUESTION, None), [branch(t) for t in TEXTS]))  # type: ignore[arg-type]
    for text, score in zip(TEXTS, scores, strict=True):
        ids = rm.encode(QUESTION, text)
        # Its chat format: system, user = question, assistant = the solution.
        chat = rm.tokenizer.decode(ids, skip_special_tokens=False)
        assert chat.startswith(f"<|im_start|>system\n{QWEN_MATH_SYSTEM}<|im_end|>")
        assert chat.endswith(f"<|im_start|>assistant\n{text}<|im_end|>\n")
        expected = ref(ids)[-1, 0].sigmoid().item()  # one label, read at the last token
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    path = tmp_path_factory.mktemp("prm")
    ref = make_qwen_remote(path, "Qwen2ForProcessRewardModel", seed=1)
    return path, ref


def test_qwen_prm_step_rewards_parity(prm):
    from transformers import PreTrainedTokenizerFast

    path, ref = prm
    rm = RewardModelScorer(path, cache_config=SMALL)
    steps = ["12 + 30: add the tens.", "10 + 30 = 40, then 2 more.", "The answer is 42."]
    # The model card's recipe, with transformers' tokenizer.
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    messages = [
        {"role": "system", "content": QWEN_MATH_SYSTEM},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": PRM_STEP_TOKEN.join(steps) + PRM_STEP_TOKEN},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = hf_tok.encode(text)
    assert rm.encode_steps(QUESTION, steps) == ids
    sep = hf_tok.convert_tokens_to_ids(PRM_STEP_TOKEN)
    mask = torch.tensor(ids) == sep
    expected = ref(ids).softmax(-1)[mask][:, 1].tolist()  # make_step_rewards
    assert len(expected) == 3
    got = rm.step_rewards(QUESTION, [steps, steps[:2]])
    assert got[0] == pytest.approx(expected, abs=1e-4)
    assert got[1] == pytest.approx(expected[:2], abs=1e-4)  # causal: a prefix's steps agree
    assert rm.step_rewards(QUESTION, [steps], last_only=True)[0] == pytest.approx(
        expected[-1:], abs=1e-4
    )


@pytest.mark.parametrize("how", ["last", "min"])
def test_qwen_prm_scores_branch_paths(prm, how):
    """A branch's steps are its path (root first), each split at blank lines."""
    path, _ = prm
    rm = RewardModelScorer(path, aggregation=how, cache_config=SMALL)
    root = branch("First, 12 + 30.\n\nAdd the tens.\n\n")
    leaf = branch("So 42.", root)
    steps = ["First, 12 + 30.", "Add the tens.", "So 42."]
    score = run(rm.score(ScoreContext(QUESTION, None), [leaf, root]))  # type: ignore[arg-type]
    full = rm.step_rewards(QUESTION, [steps, steps[:2]])
    assert score == pytest.approx([aggregate(full[0], how), aggregate(full[1], how)], abs=1e-6)


# ---- the engine: prefix sharing -----------------------------------------------------------


def test_branches_share_their_prefix_blocks(tmp_path):
    make_sequence_classifier(tmp_path, "Qwen2", 1)
    rm = RewardModelScorer(tmp_path, cache_config=SMALL)
    question = QUESTION * 3
    branches = [branch(t) for t in TEXTS]
    ids = [rm.encode(question, b.text) for b in branches]
    shared = len(ids[0])
    for other in ids[1:]:
        shared = next((i for i in range(shared) if other[i] != ids[0][i]), shared)
    scores = run(rm.score(ScoreContext(question, None), branches))  # type: ignore[arg-type]
    # Every branch's prompt was served from the cache up to the shared prefix's full blocks.
    full = shared // 4 * 4
    assert full >= 40
    assert rm.last_cached_tokens == [full] * len(branches)
    stats = rm.engine.kv_stats()
    assert stats["num_used_blocks"] == 0  # nothing held after scoring
    rm.engine.check_integrity()
    # Sharing changes nothing: the same scores without a prefix cache.
    alone = RewardModelScorer(
        tmp_path,
        cache_config=CacheConfig(kv_cache_gb=0.01, block_size=4, enable_prefix_caching=False),
    )
    expected = run(alone.score(ScoreContext(question, None), branches))  # type: ignore[arg-type]
    assert alone.last_cached_tokens == [0] * len(branches)
    assert scores == pytest.approx(expected, abs=1e-5)


def test_prm_rescoring_a_longer_path_reuses_its_blocks(prm):
    path, _ = prm
    rm = RewardModelScorer(path, cache_config=SMALL)  # aggregation "last"
    root = branch("First, 12 + 30.\n\n")
    leaf = branch("Add the tens, then the units: 42.", root)
    run(rm.score(ScoreContext(QUESTION, None), [root]))  # type: ignore[arg-type]
    n_root = len(rm.encode_steps(QUESTION, path_steps_of(root)))
    run(rm.score(ScoreContext(QUESTION, None), [leaf]))  # type: ignore[arg-type]
    # The path up to the root's separator was cached (its chat tail "<|im_end|>\n" differs).
    assert rm.last_cached_tokens[0] >= (n_root - 3) // 4 * 4 > 0


def path_steps_of(b: Branch) -> list[str]:
    from ttscale.scorers.reward_model import path_steps

    return path_steps(b)


# ---- loading ------------------------------------------------------------------------------


def test_registry_builds_reward_models(tmp_path):
    make_qwen_remote(tmp_path, "Qwen2ForRewardModel")
    checkpoint = load_checkpoint(tmp_path)
    config = RewardModelConfig.from_hf(checkpoint.config)
    assert (config.architecture, config.num_labels, config.attention_bias) == (
        "Qwen2ForRewardModel",
        1,
        True,
    )
    model = build_model(config, checkpoint.tensors)
    assert type(model).__name__ == "Qwen2ForRewardModel" and not hasattr(model, "lm_head")
    with pytest.raises(RuntimeError, match="no LM head"):
        model.compute_logits(torch.zeros(1, 64))


def test_causal_lm_refuses_a_reward_model(tmp_path):
    make_sequence_classifier(tmp_path)
    with pytest.raises(ModelLoadError, match="reward model, not a causal LM"):
        LLM(tmp_path, kv_cache_gb=0.01)


def test_load_scorer_rm_spec(tmp_path):
    make_sequence_classifier(tmp_path)
    scorer = load_scorer(f"rm:{tmp_path}")
    assert isinstance(scorer, RewardModelScorer)


def test_bad_reward_models(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        RewardModelScorer(tmp_path / "missing")

    causal = tmp_path / "causal"
    causal.mkdir()
    make_tiny_model(causal)
    with pytest.raises(ModelLoadError, match="causal LM, not a reward model"):
        RewardModelScorer(causal)

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    make_sequence_classifier(pickles)
    for f in pickles.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="no safetensors"):
        RewardModelScorer(pickles)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    make_sequence_classifier(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        RewardModelScorer(corrupt)

    mislabeled = tmp_path / "mislabeled"
    mislabeled.mkdir()
    make_sequence_classifier(mislabeled, num_labels=2)
    config = json.loads((mislabeled / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    (mislabeled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"score\.weight"):
        RewardModelScorer(mislabeled)


def test_prm_needs_its_step_token(tmp_path):
    make_qwen_remote(tmp_path, "Qwen2ForProcessRewardModel")
    save_tiny_tokenizer(tmp_path)  # overwrite with a tokenizer that lacks <extra_0>
    with pytest.raises(ModelLoadError, match="<extra_0>"):
        RewardModelScorer(tmp_path)
