"""Which architectures ttscale runs, and how to build one from a config and its weights."""

from __future__ import annotations

from typing import Any

import torch

from ttscale.errors import ModelLoadError
from ttscale.threads import one_torch_thread

# architecture name in config.json -> module:class. One family per file.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "ttscale.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "ttscale.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "ttscale.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "ttscale.models.qwen3:Qwen3ForCausalLM",
}


def resolve_architecture(hf_config: dict[str, Any]) -> str:
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    shown = ", ".join(names) if names else f"model_type={hf_config.get('model_type')!r}"
    raise ModelLoadError(
        f"unsupported architecture {shown}; ttscale supports {', '.join(ARCHITECTURES)}"
    )


def build_model(
    config,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """Instantiates the family's module on the meta device, loads the weights into it, moves
    it to `device` and packs its matmul weights for that device."""
    import importlib

    from ttscale.models.layers import RotaryEmbedding

    module_name, class_name = ARCHITECTURES[config.architecture].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    with torch.device("meta"):
        model = cls(config)
    # Buffers computed in __init__ must be real; only parameters come from the checkpoint.
    model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
    with one_torch_thread():
        model.load_weights(tensors, dtype)
        model = model.to(device).eval()
        model.pack()
    return model
