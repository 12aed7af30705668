"""Llama-style decoder (Llama 2/3, SmolLM), in plain PyTorch over flattened tokens.

Qwen2, Qwen3 and Mistral are this decoder with a few switches (see their files). The forward
takes the tokens of many sequences concatenated, `(T,)`, with their positions; the attention
context owns the KV cache, so the model never pads to batch x max_len.

Speed: q/k/v and gate/up projections are fused into one matmul each at load time (as gpt-fast
and vLLM do); `load_weights` maps the checkpoint's own parameter names onto the fused tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ttscale.attention.base import AttentionContext
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import GroupQuantized
from ttscale.loader.memory import release_free_memory
from ttscale.models.config import ModelConfig
from ttscale.models.layers import Linear, QuantizedEmbedding, RMSNorm, RotaryEmbedding
from ttscale.models.quant import cat_rows, quantized_decoder

# Weights packed between two hand-backs of freed heap memory while streaming a load.
_TRIM_EVERY = 4_000_000
# Steps over this many tokens of a quantized model run in bf16 activations (_bf16_rows);
# the fused step (models/fused.py) takes the smaller ones.
BF16_STEP_ROWS = 64


class HiddenCapture:
    """Which hidden states a forward pass keeps: `rows` (R,) of the flattened tokens at
    `layers` (numbered as transformers' `output_hidden_states`). After the pass, `states` is
    (R, len(layers), hidden_size) in the model's dtype."""

    def __init__(self, rows: torch.Tensor, layers: tuple[int, ...]) -> None:
        self.rows, self.layers = rows, layers
        self._parts: dict[int, torch.Tensor] = {}

    def take(self, layer: int, x: torch.Tensor) -> None:
        if layer in self.layers:
            self._parts[layer] = x.index_select(0, self.rows)

    @property
    def states(self) -> torch.Tensor:
        return torch.stack([self._parts[layer] for layer in self.layers], dim=1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: AttentionLayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionContext,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv_heads, self.head_dim)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalizes each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = attn(self.spec, q, k, v)  # (T, n_heads, head_dim)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, spec: AttentionLayerSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, spec)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        attn: AttentionContext,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. `forward` returns hidden states; `compute_logits` applies the head.

    Keeping the head separate lets the engine project only the rows it samples from (one per
    sequence) instead of every prefill token: at vocab 49k that is most of a prefill's FLOPs.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # `_weight` skips nn.Embedding's random init, which on the meta device goes through
        # torch._refs and imports torch._dynamo (and triton): ~150 MiB resident for nothing.
        self.embed_tokens: nn.Embedding | QuantizedEmbedding = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.attention_specs = [self.attention_spec(i) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in self.attention_specs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self._quantized: bool | None = None  # quantized_decoder(self), once weights are in
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def attention_spec(self, layer_idx: int) -> AttentionLayerSpec:
        """Layer `layer_idx`'s attention facts. One window for all layers here (Mistral's, or
        none); a family with local/global layers overrides this."""
        return AttentionLayerSpec(
            layer_idx, self.config.head_dim**-0.5, sliding_window=self.config.sliding_window
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionContext,
        capture: HiddenCapture | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden states (T, hidden_size) after the final norm.

        With `capture`, the hidden states of its rows at its layers are kept in
        `capture.states`, numbered as transformers' `output_hidden_states`: 0 = embeddings,
        i = after decoder layer i - 1, num_layers = after the final norm.
        """
        x = self.embed_tokens(input_ids)
        dtype = x.dtype
        if capture is None and dtype == torch.float32 and self._bf16_rows(x.shape[0]):
            x = x.to(torch.bfloat16)
        if capture is not None:
            capture.take(0, x)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.rotary, attn)
            if capture is not None and i + 1 < len(self.layers):
                capture.take(i + 1, x)
        x = self.norm(x)
        if capture is not None:
            capture.take(len(self.layers), x)
        return x.to(dtype)  # a bf16 step's rows back in the model's dtype (a no-op otherwise)

    def _bf16_rows(self, rows: int) -> bool:
        """Whether a step of `rows` tokens runs in bf16 activations: steps over
        BF16_STEP_ROWS tokens (prefill chunks, wide batches) of a model whose decoder
        matmuls are quantized (`quant.quantized_decoder`): their kernels take bf16 inputs
        anyway, and fp32 there only adds a cast around every matmul and doubles the bytes of
        every elementwise op (a 1000-token prefill of the embedded model: 810 ms against 604
        for the bf16 model, the same SDPA and matmul time; docs/BENCHMARKS.md, "Session 6").
        Smaller steps keep fp32 (the fused step, models/fused.py); steps that capture hidden
        states keep the model's dtype."""
        if rows <= BF16_STEP_ROWS:
            return False
        if self._quantized is None:  # weights are set after __init__: asked on first use
            self._quantized = quantized_decoder(self)
        return self._quantized

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden_size) -> fp32 logits (N, vocab_size)."""
        return self.lm_head(hidden).float()

    # ---- weights ------------------------------------------------------------------------

    # checkpoint name suffix -> (our parameter suffix, shard index within the fused tensor)
    _FUSED: ClassVar[dict[str, tuple[str, int]]] = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    def load_weights(
        self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, *, stream: bool = False
    ) -> None:
        """Loads a state dict with Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).

        Every parameter must be provided with the shape the config implies; anything missing,
        unexpected or mis-shaped raises `ModelLoadError` naming the tensor. Parameters are
        replaced, not copied into, so a model built on the meta device loads without a
        throw-away random init.

        With `stream` (CPU; the caller gives `tensors` up), entries are taken out of `tensors`
        as they load and each matmul weight is packed (`Linear.pack`) as soon as it is
        complete, so loading holds one weight's conversion at a time, not the checkpoint, its
        fused copies and the packed model all at once (docs/PERF_RSS.md).
        """
        self._dtype = dtype
        self._packed_since_trim = 0
        params = dict(self.named_parameters(remove_duplicate=False))
        shards: dict[str, list[torch.Tensor | None]] = {}
        seen: set[str] = set()
        embed = tensors.get("model.embed_tokens.weight")
        for name in list(tensors):
            tensor = tensors.pop(name) if stream else tensors[name]
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a cached buffer some old checkpoints saved; we recompute it
            ours = name.removeprefix("model.")
            if ours == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head (some exporters save both)
            for theirs, (fused, index) in self._FUSED.items():
                if f".{theirs}." in f".{ours}":
                    ours = ours.replace(theirs, fused)
                    parts = shards.setdefault(ours, [None] * (3 if "qkv" in fused else 2))
                    parts[index] = tensor
                    if stream and all(p is not None for p in parts):
                        del shards[ours]
                        self._assign(params, ours, cat_rows(parts), source=ours, pack=True)
                        seen.add(ours)
                    break
            else:
                self._assign(params, ours, tensor, source=name, pack=stream)
                seen.add(ours)
        for ours, parts in shards.items():
            if any(p is None for p in parts):
                raise ModelLoadError(f"checkpoint is missing part of {ours} (q/k/v or gate/up)")
            self._assign(params, ours, cat_rows(parts), source=ours)
            seen.add(ours)
        if self.config.tie_word_embeddings:
            seen.add("lm_head.weight")
        missing = sorted(set(params) - seen)
        if missing:
            raise ModelLoadError(
                f"checkpoint is missing {len(missing)} weight(s), e.g. {missing[:3]}"
            )
        if self.config.tie_word_embeddings:
            if isinstance(embed, GroupQuantized):  # the head computes with the file's codes
                self.lm_head.load_quantized(embed)
            else:
                self.lm_head.weight = self.embed_tokens.weight

    def layer_skip(self, keep: Sequence[int]) -> LayerSkipDraft:
        """This model with only the decoder layers `keep` (self-speculation's draft)."""
        return LayerSkipDraft(self, keep)

    def pack(self) -> None:
        """Puts every matmul weight in its fast layout for the current device (layers.Linear).
        A tied head gets its own packed copy: the embedding lookup needs the plain rows."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    def _assign(
        self,
        params: dict[str, nn.Parameter],
        name: str,
        tensor: torch.Tensor,
        source: str,
        pack: bool = False,
    ) -> None:
        """Puts `tensor` in parameter `name`; with `pack`, a Linear's weight is packed at once."""
        param = params.get(name)
        if param is None:
            raise ModelLoadError(
                f"unexpected weight {source!r} for {self.config.architecture} "
                f"(wrong architecture in config.json?)"
            )
        if tuple(param.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"weight {source!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(param.shape)}: config.json and the weights disagree"
            )
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(tensor, GroupQuantized) and isinstance(module, nn.Embedding):
            # A tied embedding: the lookup dequantizes the rows it reads (same values).
            self.set_submodule(module_name, QuantizedEmbedding(tensor, self._dtype))
            return
        if isinstance(tensor, GroupQuantized) and isinstance(module, Linear):
            module.load_quantized(tensor)
        else:
            if isinstance(tensor, GroupQuantized):
                tensor = tensor.dequantize()
            module._parameters[attr] = nn.Parameter(tensor.to(self._dtype), requires_grad=False)
        if pack and isinstance(module, Linear) and attr == "weight":
            module.pack()
            # Loading's freed temporaries sit in the C heap between live weights: handed
            # back every few million weights, the peak stays near the final size (at the
            # embedded model, about every layer: -80 MiB of peak for ~0.1 s of load time).
            self._packed_since_trim += module.in_features * module.out_features
            if self._packed_since_trim >= _TRIM_EVERY:
                release_free_memory()
                self._packed_since_trim = 0


class LayerSkipDraft(nn.Module):
    """The model with some decoder layers skipped, sharing every weight: the draft of
    self-speculative decoding (Zhang et al. 2023, "Draft & Verify"; LayerSkip's early exit
    when `keep` is a prefix). It runs its own KV cache of len(keep) layers, so its attention
    specs are renumbered 0..len(keep) - 1 and the layers' own specs are mapped onto them.
    Deterministic given the tokens, so drafting greedily with it keeps the target's
    distribution under the engine's acceptance (engine/llm_engine.py: _accept_drafts)."""

    def __init__(self, model: LlamaForCausalLM, keep: Sequence[int]) -> None:
        super().__init__()
        total = model.config.num_hidden_layers
        keep = tuple(int(i) for i in keep)
        if not keep or list(keep) != sorted(set(keep)) or not 0 <= keep[0] <= keep[-1] < total:
            raise ValueError(
                f"draft layers must be increasing, distinct and in [0, {total}), not {list(keep)}"
            )
        self.keep = keep
        # Not a submodule: the weights stay the target's (one copy, not counted twice).
        object.__setattr__(self, "target", model)
        self.config = dataclasses.replace(model.config, num_hidden_layers=len(keep))
        self.rotary = model.rotary
        self.attention_specs = [
            dataclasses.replace(model.attention_specs[i], layer_idx=j) for j, i in enumerate(keep)
        ]
        self._specs = {i: spec for i, spec in zip(keep, self.attention_specs, strict=True)}
        self.layers = [model.layers[i] for i in keep]

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        return self.target.parameters(recurse)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionContext,
        capture: HiddenCapture | None = None,
    ) -> torch.Tensor:
        if capture is not None:
            raise ValueError("a layer-skip draft keeps no hidden states")
        remapped = _RenumberedAttention(attn, self._specs)
        x = self.target.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rotary, remapped)
        return self.target.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


class _RenumberedAttention:
    """Hands the draft's own layer numbers (its KV cache's) to the attention context."""

    def __init__(self, attn: AttentionContext, specs: dict[int, AttentionLayerSpec]) -> None:
        self.attn, self.specs = attn, specs

    def __call__(
        self, spec: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return self.attn(self.specs[spec.layer_idx], q, k, v)
