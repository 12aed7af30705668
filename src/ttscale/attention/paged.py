"""Attention over a paged KV cache: a readable reference and a batched fast path.

Layout: each layer's K (and V) pool is `(num_blocks * block_size, n_kv_heads, head_dim)`, so a
token's KV lives at flat slot `block_table[pos // block_size] * block_size + pos % block_size`.
Sequences that share blocks (forks, prefix cache hits) read the same slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """The tensors of the block pool; knows nothing of sequences (see engine.block_manager)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks * block_size, n_kv_heads, head_dim)
        # zeros, not empty: padded gathers read unused slots, which must not hold NaN/Inf.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * n_kv_heads * head_dim * dtype.itemsize

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer."""
        if not copies:
            return
        bs = self.block_size
        offsets = torch.arange(bs, device=self.k.device)
        src = torch.tensor([s for s, _ in copies], device=self.k.device)[:, None] * bs + offsets
        dst = torch.tensor([d for _, d in copies], device=self.k.device)[:, None] * bs + offsets
        src, dst = src.flatten(), dst.flatten()
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to. Built once per step.

    Sequences are laid out back to back in the flattened batch: sequence i owns query rows
    `query_start[i] : query_start[i] + query_lens[i]`, its new tokens sit at positions
    `context_lens[i] - query_lens[i] ... context_lens[i] - 1`.
    """

    slot_mapping: torch.Tensor  # (T,) flat KV slot of each new token
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int

    @property
    def query_start(self) -> list[int]:
        starts, total = [], 0
        for n in self.query_lens:
            starts.append(total)
            total += n
        return starts

    def context_slots(self, i: int, device: torch.device) -> torch.Tensor:
        """(context_lens[i],) flat slots of sequence i's whole context, in position order."""
        blocks = torch.tensor(self.block_tables[i], device=device)
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=device))
        return slots.flatten()[: self.context_lens[i]]


class _PagedAttentionBase:
    def __init__(
        self, cache: KVCache, meta: AttentionMetadata, scale: float, sliding_window: int | None
    ) -> None:
        self.cache, self.meta = cache, meta
        self.scale, self.sliding_window = scale, sliding_window

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.k[layer_idx].index_copy_(0, self.meta.slot_mapping, k)
        self.cache.v[layer_idx].index_copy_(0, self.meta.slot_mapping, v)

    def _mask(self, q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor:
        """(q_len, ctx_len) bool, True = may attend: causal from offset ctx-q, plus window."""
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
        k_pos = torch.arange(ctx_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.sliding_window is not None:
            allowed &= k_pos > q_pos - self.sliding_window
        return allowed


class ReferencePagedAttention(_PagedAttentionBase):
    """Eager attention, one sequence at a time: the definition the fast path is tested against."""

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._store(layer_idx, k, v)
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        for i, start in enumerate(self.meta.query_start):
            q_len, ctx_len = self.meta.query_lens[i], self.meta.context_lens[i]
            slots = self.meta.context_slots(i, q.device)
            keys = self.cache.k[layer_idx][slots].repeat_interleave(groups, dim=1)  # (S, H, D)
            values = self.cache.v[layer_idx][slots].repeat_interleave(groups, dim=1)
            qi = q[start : start + q_len]  # (Q, H, D)
            scores = torch.einsum("qhd,shd->hqs", qi.float(), keys.float()) * self.scale
            scores.masked_fill_(~self._mask(q_len, ctx_len, q.device), float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start : start + q_len] = torch.einsum("hqs,shd->qhd", probs, values.float()).to(
                q.dtype
            )
        return out


class PagedAttention(_PagedAttentionBase):
    """Fast path: all single-token (decode) rows in one batched SDPA over gathered KV.

    Multi-token rows (prefill chunks) run one SDPA each; their cost is dominated by the linear
    layers anyway. The gather index for the decode rows is built once per step and reused by
    every layer.
    """

    def __init__(
        self, cache: KVCache, meta: AttentionMetadata, scale: float, sliding_window: int | None
    ) -> None:
        super().__init__(cache, meta, scale, sliding_window)
        device = cache.k.device
        starts = meta.query_start
        decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
        self.prefill = [i for i, n in enumerate(meta.query_lens) if n > 1]
        self.decode_rows = torch.tensor([starts[i] for i in decode], device=device)
        self.decode_gather: torch.Tensor | None = None
        if decode:
            max_ctx = max(meta.context_lens[i] for i in decode)
            max_blocks = -(-max_ctx // meta.block_size)
            tables = torch.zeros(len(decode), max_blocks, dtype=torch.long)
            for row, i in enumerate(decode):
                table = meta.block_tables[i][:max_blocks]
                tables[row, : len(table)] = torch.tensor(table)
            offsets = torch.arange(meta.block_size)
            gather = (tables[:, :, None] * meta.block_size + offsets).flatten(1)[:, :max_ctx]
            ctx = torch.tensor([meta.context_lens[i] for i in decode])
            k_pos = torch.arange(max_ctx)[None, :]
            valid = k_pos < ctx[:, None]
            if sliding_window is not None:
                valid &= k_pos > (ctx[:, None] - 1 - sliding_window)
            self.decode_gather = gather.to(device)  # (B, S)
            self.decode_mask = valid[:, None, None, :].to(device)  # (B, 1, 1, S)

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._store(layer_idx, k, v)
        out = torch.empty_like(q)
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        enable_gqa = q.shape[1] != k.shape[1]
        if self.decode_gather is not None:
            B, S = self.decode_gather.shape
            keys = k_pool[self.decode_gather].transpose(1, 2)  # (B, KVH, S, D)
            values = v_pool[self.decode_gather].transpose(1, 2)
            qd = q[self.decode_rows].unsqueeze(2)  # (B, H, 1, D)
            o = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=self.decode_mask, scale=self.scale,
                enable_gqa=enable_gqa,
            )
            out[self.decode_rows] = o.squeeze(2)
        starts = self.meta.query_start
        for i in self.prefill:
            start, q_len, ctx_len = starts[i], self.meta.query_lens[i], self.meta.context_lens[i]
            slots = self.meta.context_slots(i, q.device)
            keys = k_pool[slots].transpose(0, 1).unsqueeze(0)  # (1, KVH, S, D)
            values = v_pool[slots].transpose(0, 1).unsqueeze(0)
            qi = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
            if q_len == ctx_len and self.sliding_window is None:
                o = F.scaled_dot_product_attention(
                    qi, keys, values, is_causal=True, scale=self.scale, enable_gqa=enable_gqa
                )
            else:
                mask = self._mask(q_len, ctx_len, q.device)
                o = F.scaled_dot_product_attention(
                    qi, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=enable_gqa
                )
            out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        return out
