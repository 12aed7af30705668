"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF load of the file.

Greedy tokens must be identical (32 per prompt); prompt logits agree within 2e-3 max abs
(fp32, 30 layers: oneDNN's and MKL's summation orders differ, nothing else).
"""

from __future__ import annotations

import pytest
import torch

from ttscale import LLM, SamplingParams
from ttscale.loader.default_model import default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Combien font 12 plus 30 ? Réponds en français.",
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return tok, model


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_gb=0.2, quantize="none")  # parity is pinned to dequantized fp32


def test_greedy_tokens_equal_transformers_gguf_load(reference, llm):
    tok, model = reference
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = llm.tokenizer.encode_chat(messages)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        with torch.inference_mode():
            ref = model.generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )[0, len(ids) :].tolist()
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))
        assert out[0].outputs[0].token_ids == ref, prompt


def test_prompt_logits_close_to_transformers(reference, llm):
    _, model = reference
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0, -1]
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]
    top = out.outputs[0].top_logprobs[0]
    ref_lp = torch.log_softmax(ref.float(), -1)
    for token, lp in top:
        assert abs(ref_lp[token].item() - lp) < 2e-3
