"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random HF checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 320

# Tiny models are all small ops: one thread avoids thread-pool barriers (and keeps CI quick
# when another process shares the cores).
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Test-time scaling spends more compute at inference: samples, votes and search.",
    "Paged KV caches share prefix blocks between forked sequences.",
    "12 + 30 = 42. Café, naïve, 你好, 🙂.",
] * 20


@functools.cache
def _tiny_tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_tokenizer(path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=_tiny_tokenizer_object(),
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(path))


ARCH_CONFIGS = {
    "llama": dict(cls="LlamaConfig", model="LlamaForCausalLM"),
    "llama3-rope-untied": dict(
        cls="LlamaConfig",
        model="LlamaForCausalLM",
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": dict(cls="Qwen2Config", model="Qwen2ForCausalLM"),
    "qwen3": dict(cls="Qwen3Config", model="Qwen3ForCausalLM", head_dim=24),
    "mistral": dict(cls="MistralConfig", model="MistralForCausalLM", sliding_window=None),
}


# The size of every tiny test model (weights drawn with std 0.3: see make_tiny_model).
TINY_DIMS = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
)


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides):
    """Saves a random-weight HF model (safetensors + tokenizer) to `path`; returns the HF model.

    Weights are drawn with std 0.3 rather than HF's 0.02 so logits are spread out: greedy
    parity then tests the model, not which of several near-tied tokens rounding favours.
    """
    import transformers

    spec = dict(ARCH_CONFIGS[arch])
    cls = getattr(transformers, spec.pop("cls"))
    model_cls = getattr(transformers, spec.pop("model"))
    kwargs = dict(TINY_DIMS, tie_word_embeddings=True, eos_token_id=2, bos_token_id=0)
    kwargs.update(spec)
    kwargs.update(overrides)
    config = cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomize them to test them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    save_tiny_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder, one per test module (modules may override it)."""
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    """An engine on the tiny model with a small pool of 4-token blocks, one per module."""
    from ttscale import LLM

    return LLM(model_dir, kv_cache_gb=0.01, block_size=4)


def assert_pool_full(llm) -> None:
    """After a scenario: the KV bookkeeping is consistent, every block is free again and the
    engine holds no request (checked through the engine's public views)."""
    llm.engine.check_integrity()
    kv = llm.engine.kv_stats()
    assert kv["num_free_blocks"] == kv["num_blocks"]
    assert not llm.engine.requests and not llm.engine.sequences


def tiny_llm(path, **options):
    """An engine on a tiny model folder with a small pool of 4-token blocks (overridable)."""
    from ttscale import LLM

    options.setdefault("kv_cache_gb", 0.01)
    options.setdefault("block_size", 4)
    return LLM(path, **options)
