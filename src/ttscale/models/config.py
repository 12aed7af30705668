"""Model hyper-parameters, read from a Hugging Face `config.json` dict (or one a GGUF produced)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ttscale.errors import ModelLoadError


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder. Invariant: every field is consistent on creation."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window: int | None = None  # Mistral: each query sees at most this many keys
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(
                    f"config field {name} must be a positive integer, got {value!r}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Builds a config from a `config.json` dict; unknown architectures are refused."""
        from ttscale.models.registry import resolve_architecture

        architecture = resolve_architecture(hf)
        family_defaults = _FAMILY_FLAGS[architecture]

        def get(key: str, default: Any = None) -> Any:
            value = hf.get(key, default)
            return default if value is None else value

        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            eos = get("eos_token_id", ())
            sliding_window = None
            if architecture == "MistralForCausalLM" or get("use_sliding_window", False):
                sliding_window = get("sliding_window")
            return cls(
                architecture=architecture,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(get("num_key_value_heads", heads)),
                head_dim=int(get("head_dim", hidden // heads)),
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(hf)),
                rope_scaling=_rope_scaling(hf),
                max_position_embeddings=int(get("max_position_embeddings", 4096)),
                # Absent means untied: the default of transformers' Llama, Mistral, Qwen2 and
                # Qwen3 configs (PretrainedConfig's True applies to none of them).
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                attention_bias=bool(get("attention_bias", family_defaults["attention_bias"])),
                qk_norm=family_defaults["qk_norm"],
                sliding_window=int(sliding_window) if sliding_window else None,
                bos_token_id=get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
            )
        except KeyError as e:
            raise ModelLoadError(f"config is missing the required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config has a malformed field: {e}") from None


# Per-family switches of the one Llama-style decoder (see models/llama.py).
_FAMILY_FLAGS: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {"attention_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"attention_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"attention_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"attention_bias": False, "qk_norm": True},
}


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into `rope_parameters`; older configs keep it top-level.
    params = hf.get("rope_parameters") or {}
    return params.get("rope_theta") or hf.get("rope_theta") or 10000.0


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    return dict(scaling, rope_type=kind)
