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

# Reward models: a score head on one of the decoders above (models/reward.py), run by the
# engine without sampling. architecture -> (module:class, the causal family of its decoder).
# Kept apart so nothing that needs a causal LM (LLM, the cost model) accepts one.
REWARD_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForSequenceClassification": (
        "ttscale.models.reward:LlamaForSequenceClassification",
        "LlamaForCausalLM",
    ),
    "Qwen2ForSequenceClassification": (
        "ttscale.models.reward:Qwen2ForSequenceClassification",
        "Qwen2ForCausalLM",
    ),
    "Qwen2ForRewardModel": ("ttscale.models.reward:Qwen2ForRewardModel", "Qwen2ForCausalLM"),
    "Qwen2ForProcessRewardModel": (
        "ttscale.models.reward:Qwen2ForProcessRewardModel",
        "Qwen2ForCausalLM",
    ),
}


def resolve_architecture(hf_config: dict[str, Any]) -> str:
    """The config's causal-LM architecture; a reward model or an unknown one is refused."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    for name in names:
        if name in REWARD_ARCHITECTURES:
            raise ModelLoadError(
                f"{name} is a reward model, not a causal LM: it scores text but cannot "
                "generate; use it as a verifier (scorer rm:PATH)"
            )
    raise ModelLoadError(
        f"unsupported architecture {_shown(hf_config)}; ttscale supports {', '.join(ARCHITECTURES)}"
    )


def resolve_reward_architecture(hf_config: dict[str, Any]) -> str:
    """The config's reward-model architecture; a causal LM or an unknown one is refused."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in REWARD_ARCHITECTURES:
            return name
    kind = "a causal LM, not a reward model" if set(names) & set(ARCHITECTURES) else "unsupported"
    raise ModelLoadError(
        f"{_shown(hf_config)} is {kind}; reward models ttscale runs: "
        f"{', '.join(REWARD_ARCHITECTURES)}"
    )


def _shown(hf_config: dict[str, Any]) -> str:
    names = hf_config.get("architectures") or []
    return ", ".join(names) if names else f"model_type={hf_config.get('model_type')!r}"


def build_model(
    config,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    consume: bool = False,
):
    """Instantiates the family's module on the meta device, loads the weights into it, moves
    it to `device` and packs its matmul weights for that device. A reward model's config
    (models/reward.py: RewardModelConfig) builds its reward class the same way.

    `consume=True`: the caller gives `tensors` up. On CPU the dict is emptied as the weights
    load and each weight is packed as soon as it is complete (`load_weights(stream=True)`),
    so the conversion holds one weight's temporaries at a time: peak memory stays near the
    model's own instead of checkpoint + model (docs/PERF_RSS.md)."""
    import importlib

    from ttscale.models.layers import RotaryEmbedding

    arch = config.architecture
    target = ARCHITECTURES[arch] if arch in ARCHITECTURES else REWARD_ARCHITECTURES[arch][0]
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    with torch.device("meta"):
        model = cls(config)
    # Buffers computed in __init__ must be real; only parameters come from the checkpoint.
    model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
    with one_torch_thread():
        if consume and torch.device(device).type == "cpu":
            model.load_weights(tensors, dtype, stream=True)
        else:
            model.load_weights(tensors, dtype)
        model = model.to(device).eval()
        model.pack()
    return model
