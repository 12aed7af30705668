"""Mistral: the Llama decoder; sliding-window attention comes from the config (see ModelConfig.sliding_window) and is applied by the attention context."""

from ttscale.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Same modules and parameter names as Llama; the differences are config switches."""
