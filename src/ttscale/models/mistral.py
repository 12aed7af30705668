"""Mistral: the Llama decoder; its sliding window (ModelConfig.sliding_window) is applied by
the attention context."""

from ttscale.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Same modules and parameter names as Llama; the differences are config switches."""
