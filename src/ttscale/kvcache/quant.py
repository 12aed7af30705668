"""Quantized KV pools. The formats store fewer bytes per token and dequantize only the rows a
read gathers, so no full-precision copy of the pool (or of a whole context) ever exists."""

from __future__ import annotations

import torch

from ttscale.kvcache.pool import KVCache

INT8_MAX = 127


class Int8KVCache(KVCache):
    """int8 K and V, symmetric, one fp32 scale per (token, KV head): row = round(x / s) with
    s = max|x| / 127 over the head's channels. Per-token scales make a token's bytes
    independent of its neighbours, so prefix caching, forks and copy-on-write work on blocks
    exactly as in a float pool (`row_tensors` includes the scales, so a copied block keeps
    them). Bytes per token and layer: 2 * KVH * (D + 4), 0.53x bf16 at head_dim 64."""

    quantized = True

    def _allocate(self, rows: int, device: torch.device) -> None:
        shape = (self.num_layers, rows, self.n_kv_heads, self.head_dim)
        self.k = torch.empty(shape, dtype=torch.int8, device=device)
        self.v = torch.empty(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.empty(shape[:3], dtype=torch.float32, device=device)
        self.v_scale = torch.empty(shape[:3], dtype=torch.float32, device=device)

    def row_tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale]

    @staticmethod
    def token_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_kv_heads * (head_dim + 4)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("an int8 KV pool has no float rows: read through keys() / values()")

    def _write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_int8(x)
            codes[layer_idx].index_copy_(0, slots, q)
            scales[layer_idx].index_copy_(0, slots, s)

    def keys(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _dequant(self.k[layer_idx], self.k_scale[layer_idx], slots, dtype)

    def values(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _dequant(self.v[layer_idx], self.v_scale[layer_idx], slots, dtype)

    def keys_by_head(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._by_head(self.k[layer_idx], self.k_scale[layer_idx], slots, dtype)

    def values_by_head(
        self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return self._by_head(self.v[layer_idx], self.v_scale[layer_idx], slots, dtype)

    def _by_head(
        self, codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        flat = self.head_rows(slots)
        rows = codes.view(-1, self.head_dim).index_select(0, flat).to(dtype)
        rows.mul_(scales.view(-1).index_select(0, flat).to(dtype)[:, None])
        return rows.view(*slots.shape, self.head_dim)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, KVH, D) -> int8 codes (T, KVH, D) and fp32 scales (T, KVH)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / INT8_MAX
    codes = torch.round(x / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def _dequant(
    codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    rows = codes.index_select(0, slots).to(dtype)
    return rows.mul_(scales.index_select(0, slots).to(dtype)[..., None])


class KiviKVCache(KVCache):
    """KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
    Cache"): asymmetric `BITS`-bit codes, keys quantized per channel over a group of tokens
    (their outlier channels stay in their own scale), values per token in groups of
    `VALUE_GROUP` channels, and the most recent tokens kept in full precision until their
    group is complete.

    In a paged pool the key group is the block (`block_size` tokens, KIVI's 32 with
    block_size=32): a block's scales then belong to the block alone, so prefix sharing, forks
    and copy-on-write work on blocks as in a float pool. The residual is the block still
    being written: its K and V live in full precision in a staging area (`stage_of[block]`
    -> stage) until its last slot is written, when every layer quantizes it and the stage is
    released. So a sequence keeps at most `block_size - 1` residual tokens. A freed partial
    block keeps its stage until the block is reused or rewritten (the pool does not see
    frees); the staging area grows on demand. Bytes per token and layer at head_dim 64,
    kivi4: 64 (codes) + 8 (value scale and minimum) + 256 / block_size (key scale and
    minimum per channel): 0.34x bf16 at block 16, 0.31x at 32; kivi2: 0.22x and 0.19x.
    """

    quantized = True
    BITS = 4
    VALUE_GROUP = 32
    INITIAL_STAGES = 32

    def _allocate(self, rows: int, device: torch.device) -> None:
        L, kvh, D, bs = self.num_layers, self.n_kv_heads, self.head_dim, self.block_size
        per = 8 // self.BITS
        if D % self.VALUE_GROUP or D % per:
            raise ValueError(f"KIVI needs head_dim divisible by {self.VALUE_GROUP}, not {D}")
        blocks = rows // bs
        self.k = torch.empty((L, rows, kvh, D // per), dtype=torch.uint8, device=device)
        self.v = torch.empty((L, rows, kvh, D // per), dtype=torch.uint8, device=device)
        groups = D // self.VALUE_GROUP
        # Zeroed (small next to the codes): a block staged for the first time dequantizes
        # finite values from them.
        self.v_scale = torch.zeros((L, rows, kvh, groups), dtype=torch.float16, device=device)
        self.v_min = torch.zeros((L, rows, kvh, groups), dtype=torch.float16, device=device)
        self.k_scale = torch.zeros((L, blocks, kvh, D), dtype=torch.float16, device=device)
        self.k_min = torch.zeros((L, blocks, kvh, D), dtype=torch.float16, device=device)
        self.stage_of = torch.full((blocks,), -1, dtype=torch.long, device=device)
        self._free_stages: list[int] = []
        self.stage_k = torch.empty((L, 0, kvh, D), dtype=self.dtype, device=device)
        self.stage_v = torch.empty((L, 0, kvh, D), dtype=self.dtype, device=device)
        self._grow_stages(self.INITIAL_STAGES)

    def row_tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.v_scale, self.v_min]

    def block_tensors(self) -> list[torch.Tensor]:
        return [self.k_scale, self.k_min]

    @classmethod
    def block_bytes(
        cls, n_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int
    ) -> float:
        codes = 2 * head_dim * cls.BITS / 8
        value_scales = 2 * 2 * head_dim / cls.VALUE_GROUP  # fp16 scale + minimum per group
        key_scales = 2 * 2 * head_dim  # fp16 scale + minimum per channel, per block
        return n_kv_heads * (block_size * (codes + value_scales) + key_scales)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("a KIVI KV pool has no float rows: read through keys() / values()")

    @property
    def staged_blocks(self) -> int:
        return int((self.stage_of >= 0).sum())

    # ---- the residual (staging) ---------------------------------------------------------

    def _grow_stages(self, extra: int) -> None:
        L, _, kvh, D = self.stage_k.shape
        old = self.stage_k.shape[1] // self.block_size
        more = torch.empty((L, extra * self.block_size, kvh, D), dtype=self.dtype)
        self.stage_k = torch.cat([self.stage_k, more.to(self.device)], dim=1)
        self.stage_v = torch.cat([self.stage_v, more.to(self.device)], dim=1)
        self._free_stages.extend(range(old + extra - 1, old - 1, -1))

    def _stage(self, blocks: list[int], fresh: set[int] | None = None) -> None:
        """Gives each block a stage holding its current (dequantized) contents in every
        layer, so a write into a block quantized earlier (after a rollback) keeps the rest.
        Blocks in `fresh` are written from their first slot on: nothing to keep."""
        for b in blocks:
            if not self._free_stages:
                self._grow_stages(
                    max(self.INITIAL_STAGES, self.stage_k.shape[1] // self.block_size)
                )
            stage = self._free_stages.pop()
            self.stage_of[b] = stage
            if fresh is not None and b in fresh:
                continue
            bs = self.block_size
            slots = torch.arange(b * bs, (b + 1) * bs, device=self.device)
            rows = slice(stage * bs, (stage + 1) * bs)
            for layer in range(self.num_layers):
                self.stage_k[layer, rows] = self._packed_keys(layer, slots, self.dtype)
                self.stage_v[layer, rows] = self._packed_values(layer, slots, self.dtype)

    def _unstage(self, blocks: torch.Tensor) -> None:
        stages = self.stage_of[blocks]
        self._free_stages.extend(int(s) for s in stages if s >= 0)
        self.stage_of[blocks] = -1

    # ---- writes ---------------------------------------------------------------------------

    def _write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """New rows go to their block's stage; a block whose last slot this writes is
        quantized from its stage in this layer, and unstaged after the last layer (layers
        store in order, 0 first)."""
        bs = self.block_size
        blocks = slots // bs
        if layer_idx == 0:
            todo = [b for b in dict.fromkeys(blocks.tolist()) if self.stage_of[b] < 0]
            if todo:
                fresh = set((slots[slots % bs == 0] // bs).tolist())
                self._stage(todo, fresh)
        stage_rows = self.stage_of[blocks] * bs + slots % bs
        self.stage_k[layer_idx].index_copy_(0, stage_rows, k.to(self.dtype))
        self.stage_v[layer_idx].index_copy_(0, stage_rows, v.to(self.dtype))
        full = blocks[slots % bs == bs - 1]
        if full.numel() == 0:
            return
        offsets = torch.arange(bs, device=slots.device)
        rows = (self.stage_of[full][:, None] * bs + offsets).flatten()
        n = full.numel()
        keys = self.stage_k[layer_idx].index_select(0, rows).float()
        keys = keys.view(n, bs, self.n_kv_heads, self.head_dim)
        codes, scale, minimum = _quantize_asym(keys, dim=1, bits=self.BITS)
        block_slots = (full[:, None] * bs + offsets).flatten()
        self.k[layer_idx].index_copy_(0, block_slots, _pack(codes, self.BITS).flatten(0, 1))
        self.k_scale[layer_idx].index_copy_(0, full, scale.squeeze(1))
        self.k_min[layer_idx].index_copy_(0, full, minimum.squeeze(1))
        values = self.stage_v[layer_idx].index_select(0, rows).float()
        g = self.VALUE_GROUP
        grouped = values.view(n * bs, self.n_kv_heads, self.head_dim // g, g)
        codes, scale, minimum = _quantize_asym(grouped, dim=-1, bits=self.BITS)
        codes = codes.view(n * bs, self.n_kv_heads, self.head_dim)
        self.v[layer_idx].index_copy_(0, block_slots, _pack(codes, self.BITS))
        self.v_scale[layer_idx].index_copy_(0, block_slots, scale.squeeze(-1))
        self.v_min[layer_idx].index_copy_(0, block_slots, minimum.squeeze(-1))
        if layer_idx == self.num_layers - 1:
            self._unstage(full)

    def copy_blocks(self, copies) -> None:
        """Copy-on-write also copies a staged (partial) block's residual."""
        super().copy_blocks(copies)
        bs = self.block_size
        for src, dst in copies:
            if self.stage_of[src] < 0:
                if self.stage_of[dst] >= 0:
                    self._unstage(torch.tensor([dst], device=self.device))
                continue
            if self.stage_of[dst] < 0:
                self._stage([dst])
            s, d = int(self.stage_of[src]), int(self.stage_of[dst])
            self.stage_k[:, d * bs : (d + 1) * bs] = self.stage_k[:, s * bs : (s + 1) * bs]
            self.stage_v[:, d * bs : (d + 1) * bs] = self.stage_v[:, s * bs : (s + 1) * bs]

    # ---- reads ----------------------------------------------------------------------------

    def keys(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._with_residual(
            self._packed_keys(layer_idx, slots, dtype), self.stage_k[layer_idx], slots
        )

    def values(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._with_residual(
            self._packed_values(layer_idx, slots, dtype), self.stage_v[layer_idx], slots
        )

    def keys_by_head(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._by_head(self.keys, layer_idx, slots, dtype)

    def values_by_head(
        self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return self._by_head(self.values, layer_idx, slots, dtype)

    def _by_head(self, read, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype):
        """slots (..., KVH, S): dequantizes every head of the slots read, keeps each head's
        own (KIVI's scales are per block and per token: no cheaper per-head path)."""
        kvh = self.n_kv_heads
        flat = slots.movedim(-2, -1).reshape(-1)  # (..., S, KVH) -> each slot per head
        rows = read(layer_idx, flat, dtype).view(-1, kvh, kvh, self.head_dim)
        heads = torch.arange(kvh, device=slots.device)
        picked = rows[:, heads, heads]  # head h of the slot head h asked for
        shape = (*slots.shape[:-2], slots.shape[-1], kvh, self.head_dim)
        return picked.view(shape).movedim(-2, -3)

    def _packed_keys(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype):
        codes = _unpack(self.k[layer_idx].index_select(0, slots), self.BITS).to(dtype)
        blocks = slots // self.block_size
        scale = self.k_scale[layer_idx].index_select(0, blocks).to(dtype)
        minimum = self.k_min[layer_idx].index_select(0, blocks).to(dtype)
        return codes.mul_(scale).add_(minimum)

    def _packed_values(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype):
        codes = _unpack(self.v[layer_idx].index_select(0, slots), self.BITS).to(dtype)
        g = self.VALUE_GROUP
        scale = self.v_scale[layer_idx].index_select(0, slots).to(dtype)
        minimum = self.v_min[layer_idx].index_select(0, slots).to(dtype)
        codes = codes.view(*codes.shape[:-1], -1, g)
        return codes.mul_(scale[..., None]).add_(minimum[..., None]).flatten(-2)

    def _with_residual(
        self, packed: torch.Tensor, stage: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Rows of staged blocks come from the stage (full precision), not from codes."""
        stages = self.stage_of.index_select(0, slots // self.block_size)
        staged = stages >= 0
        if not bool(staged.any()):
            return packed
        rows = stages[staged] * self.block_size + slots[staged] % self.block_size
        packed[staged] = stage.index_select(0, rows).to(packed.dtype)
        return packed


class Kivi2KVCache(KiviKVCache):
    BITS = 2


def _quantize_asym(
    x: torch.Tensor, dim: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `bits`-bit codes of x along `dim` (min .. max -> 0 .. 2^bits - 1): codes
    (uint8, x's shape) and the fp16 scale and minimum (x's shape, `dim` kept as 1). Codes are
    computed against the fp16-rounded scale and minimum, the ones dequantization uses."""
    levels = 2**bits - 1
    minimum = x.amin(dim=dim, keepdim=True).half()
    scale = ((x.amax(dim=dim, keepdim=True) - minimum.float()) / levels).half()
    safe = scale.float().clamp_min(1e-8)
    codes = torch.round((x - minimum.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, minimum


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) codes < 2^bits -> (..., D * bits / 8) uint8, low bits first."""
    per = 8 // bits
    grouped = codes.view(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack`: (..., D * bits / 8) uint8 -> (..., D) uint8."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.flatten(-2)


_POOLS: dict[str, type[KVCache]] = {
    "int8": Int8KVCache,
    "kivi4": KiviKVCache,
    "kivi2": Kivi2KVCache,
}


def pool_class(kv_format: str) -> type[KVCache]:
    """The pool class of a canonical `CacheConfig.kv_cache_dtype` (float formats: KVCache)."""
    return _POOLS.get(kv_format, KVCache)


def kv_bytes_per_value(
    kv_format: str, head_dim: int, read_dtype: torch.dtype, block_size: int = 16
) -> float:
    """Bytes one K or V value takes in a pool of `kv_format` (a canonical
    `CacheConfig.kv_cache_dtype`), scales included: what the cost model prices KV traffic at.
    `read_dtype`: the dtype a float pool stores (`CacheConfig.pool_dtype`); `block_size`:
    a per-block scale's share (KIVI's key scales)."""
    per_block = pool_class(kv_format).block_bytes(1, head_dim, read_dtype, block_size)
    return per_block / block_size / (2 * head_dim)
