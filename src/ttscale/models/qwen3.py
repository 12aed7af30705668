"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE (ModelConfig.qk_norm)
and a head_dim independent of hidden_size."""

from ttscale.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Same modules and parameter names as Llama; the differences are config switches."""
