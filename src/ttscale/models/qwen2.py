"""Qwen2: the Llama decoder with a bias on the q/k/v projections (ModelConfig.attention_bias)."""

from ttscale.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Same modules and parameter names as Llama; the differences are config switches."""
