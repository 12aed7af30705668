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
        # One extra "null" block after the pool, kept at zero: padded gathers read it, so
        # masked positions never meet NaN garbage (0 * NaN = NaN). The pool itself is left
        # uninitialized: every slot is written before it is read, and untouched pages of a
        # multi-GiB pool then cost no resident memory.
        shape = (num_layers, (num_blocks + 1) * block_size, n_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.null_slot = num_blocks * block_size
        self.k[:, self.null_slot :].zero_()
        self.v[:, self.null_slot :].zero_()

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
        slots = blocks[:, None] * self.block_size + torch.arange(self.block_size, device=device)
        return slots.flatten()[: self.context_lens[i]]


class _PagedAttentionBase:
    def __init__(
        self, cache: KVCache, meta: AttentionMetadata, scale: float, sliding_window: int | None
    ) -> None:
        self.cache, self.meta = cache, meta
        self.scale, self.sliding_window = scale, sliding_window
        # KV token slots read per layer this step; the cascade path lowers it (cost model),
        # reading `kv_tokens_shared` of them once for `shared_groups` fork groups.
        self.kv_tokens_read = sum(meta.context_lens)
        self.kv_tokens_shared = 0
        self.shared_groups = 0

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


def _cpu_flash_attention() -> object | None:
    """torch's CPU flash-attention kernel, which also returns each row's log-sum-exp (what
    merging two partial softmaxes needs; the public SDPA does not return it). None if this
    torch build lacks it."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op.default if op is not None else None


_CPU_FLASH = _cpu_flash_attention()


class PagedAttention(_PagedAttentionBase):
    """Fast path. Decode rows (one query token) run batched; prefill chunks run one SDPA each.

    Decode rows whose block tables start with the same full blocks (the n samples of one
    prompt, the branches of a search tree) form a group, and the group's shared prefix is read
    once: its keys are gathered once and hit by every query of the group in one matmul
    ("cascade" attention). Each row then attends over its private suffix, and the two partial
    softmaxes are merged by their log-sum-exp. KV traffic per step drops from
    sum(context) to prefix + sum(suffix), which is what makes many samples cheap.

    Each pass returns its normalized output and log-sum-exp. On CPU a pass over enough keys
    runs torch's fused flash-attention kernel (no score matrix in memory, one op instead of
    ~7); shorter ones, other devices, and `fused=False` use batched matmuls. KV is gathered
    with `index_select`, several times faster on CPU than advanced indexing.
    """

    # A prefix shorter than this many blocks is not worth a separate matmul.
    MIN_SHARED_BLOCKS = 2

    def __init__(
        self,
        cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        fused: bool = True,
    ) -> None:
        super().__init__(cache, meta, scale, sliding_window)
        device = cache.k.device
        self.fused = fused and device.type == "cpu" and _CPU_FLASH is not None
        starts = meta.query_start
        bs = meta.block_size
        decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
        self.prefill = [i for i, n in enumerate(meta.query_lens) if n > 1]
        self.decode_rows = torch.tensor([starts[i] for i in decode], device=device)
        self.kv_tokens_read = sum(meta.context_lens[i] for i in self.prefill)
        if not decode:
            self.suffix_gather = None
            return

        # Shared prefixes: group decode rows by first block; a group's prefix is the longest
        # common run of blocks that lie wholly before every member's current token.
        prefix_blocks = [0] * len(decode)
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows in decode order, slots)
        if sliding_window is None:
            by_first: dict[int, list[int]] = {}
            for row, i in enumerate(decode):
                by_first.setdefault(meta.block_tables[i][0], []).append(row)
            for rows in by_first.values():
                if len(rows) < 2:
                    continue
                tables = [meta.block_tables[decode[r]] for r in rows]
                limit = min((meta.context_lens[decode[r]] - 1) // bs for r in rows)
                common = 0
                first = tables[0]
                while common < limit and all(t[common] == first[common] for t in tables):
                    common += 1
                if common < self.MIN_SHARED_BLOCKS:
                    continue
                for r in rows:
                    prefix_blocks[r] = common
                blocks = torch.tensor(first[:common])
                slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
                self.groups.append((torch.tensor(rows, device=device), slots.to(device)))
                self.kv_tokens_read += common * bs
                self.kv_tokens_shared += common * bs

        self.shared_groups = len(self.groups)
        # Private suffixes, padded to the longest; padding reads the zeroed null block.
        starts_pos = [p * bs for p in prefix_blocks]
        suffix_lens = [meta.context_lens[i] - s for i, s in zip(decode, starts_pos, strict=True)]
        self.kv_tokens_read += sum(suffix_lens)
        width = max(suffix_lens)
        gather = torch.full((len(decode), width), cache.null_slot, dtype=torch.long)
        for row, i in enumerate(decode):
            table = torch.tensor(meta.block_tables[i][prefix_blocks[row] :])
            slots = (table[:, None] * bs + torch.arange(bs)).flatten()[: suffix_lens[row]]
            gather[row, : suffix_lens[row]] = slots
        k_pos = torch.arange(width)[None, :]
        lens = torch.tensor(suffix_lens)[:, None]
        valid = k_pos < lens
        if sliding_window is not None:
            valid &= k_pos > lens - 1 - sliding_window
        self.suffix_gather = gather.flatten().to(device)  # (B * S,) row-major
        self.suffix_width = width
        self.suffix_bias: torch.Tensor | None = None  # (B, 1, 1, S); None: nothing masked
        if not bool(valid.all()):
            bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
            self.suffix_bias = bias[:, None, None, :].to(device, cache.k.dtype)

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._store(layer_idx, k, v)
        out = torch.empty_like(q)
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if self.suffix_gather is not None:
            out[self.decode_rows] = self._decode(q[self.decode_rows], k_pool, v_pool)
        self._prefill(q, out, k_pool, v_pool)
        return out

    def _decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """q: (B, H, D) one token per row -> (B, H, D)."""
        B, H, D = q.shape
        kvh = k_pool.shape[1]
        g = H // kvh
        S = self.suffix_width
        # GQA without repeating KV: the g query heads of one KV head act as g query rows.
        qg = q.view(B, kvh, g, D)
        keys = self._gather(k_pool, self.suffix_gather).view(B, S, kvh, D).transpose(1, 2)
        values = self._gather(v_pool, self.suffix_gather).view(B, S, kvh, D).transpose(1, 2)
        out, lse = self._attend(qg, keys, values, self.suffix_bias)  # (B, KVH, G, D), (B, KVH, G)
        for rows, slots in self.groups:
            # Prefix read once for the group: its R*g queries per KV head in one pass.
            R = rows.shape[0]
            qp = qg[rows].transpose(0, 1).reshape(1, kvh, R * g, D)
            kp = self._gather(k_pool, slots).transpose(0, 1).unsqueeze(0)  # (1, KVH, P, D)
            vp = self._gather(v_pool, slots).transpose(0, 1).unsqueeze(0)
            op, lsep = self._attend(qp, kp, vp, None)
            op = op.view(kvh, R, g, D).transpose(0, 1)  # (R, KVH, G, D)
            lsep = lsep.view(kvh, R, g).transpose(0, 1)  # (R, KVH, G)
            # Merge the two normalized partial softmaxes, weighted by their total mass.
            ls = lse[rows]
            total = torch.logaddexp(ls, lsep)
            weight_s = torch.exp(ls - total)[..., None]
            weight_p = torch.exp(lsep - total)[..., None]
            out[rows] = out[rows] * weight_s + op * weight_p
        return out.reshape(B, H, D).to(q.dtype)

    def _gather(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(len(slots), KVH, D) rows of `pool`."""
        return pool.index_select(0, slots)

    # Below this many keys, many tiny (batch, head) problems run faster as batched matmuls
    # than through the flash kernel's per-problem set-up. Measured on the 2-core AVX-512 dev
    # VM: 64 rows x 16 keys 189 vs 345 us (matmul wins); x 64 keys 554 vs 526 us (even);
    # from 128 keys flash wins (2x at 256, 6x at 512). 48 sits between the last two points
    # measured, where the two are about even.
    FLASH_MIN_KEYS = 48

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention without masking beyond `bias`: q (N, Hk, M, D), k and v
        (N, Hk, S, D) -> fp32 output (N, Hk, M, D) and log-sum-exp of the scores (N, Hk, M),
        which lets partial softmaxes over disjoint keys be merged."""
        if self.fused and k.shape[-2] >= self.FLASH_MIN_KEYS:
            out, lse = _CPU_FLASH(q, k, v, attn_mask=bias, scale=self.scale)
            return out.float(), lse.float()
        # fp32 softmax whatever the KV dtype.
        scores = torch.matmul(q.float() * self.scale, k.float().transpose(-1, -2))
        if bias is not None:
            scores = scores + bias
        m = scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores - m)
        denom = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p, v.float()) / denom
        return out, (m + denom.log()).squeeze(-1)

    def _prefill(
        self, q: torch.Tensor, out: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor
    ) -> None:
        enable_gqa = q.shape[1] != k_pool.shape[1]
        starts = self.meta.query_start
        for i in self.prefill:
            start, q_len, ctx_len = starts[i], self.meta.query_lens[i], self.meta.context_lens[i]
            slots = self.meta.context_slots(i, q.device)
            keys = self._gather(k_pool, slots).transpose(0, 1).unsqueeze(0)  # (1, KVH, S, D)
            values = self._gather(v_pool, slots).transpose(0, 1).unsqueeze(0)
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
