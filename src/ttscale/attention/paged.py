"""The fast paged-attention path: batched decode with fork groups' shared prefixes read once.

Layout and access go through `kvcache.KVCache`; the readable definition is `reference.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttscale.attention.base import PagedAttentionBase, soft_cap
from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.sparse import select_blocks, selected_slots
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.kvcache.pool import KVCache


def _cpu_flash_attention() -> object | None:
    """torch's CPU flash-attention kernel, which also returns each row's log-sum-exp (what
    merging two partial softmaxes needs; the public SDPA does not return it). None if this
    torch build lacks it."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op.default if op is not None else None


_CPU_FLASH = _cpu_flash_attention()


@dataclass
class _DecodeLayout:
    """How the decode rows of one step read the cache under one window setting."""

    groups: list[tuple[torch.Tensor, torch.Tensor]]  # (rows in decode order, prefix slots)
    suffix_gather: torch.Tensor  # (B * S,) row-major private-suffix slots, null-padded
    suffix_width: int
    suffix_bias: torch.Tensor | None  # (B, 1, 1, S); None: nothing masked
    kv_tokens_read: int
    kv_tokens_shared: int


class PagedAttention(PagedAttentionBase):
    """Fast path. Decode rows (one query token) run batched; prefill chunks run one SDPA each.

    Decode rows whose block tables start with the same full blocks (the n samples of one
    prompt, the branches of a search tree) form a group, and the group's shared prefix is read
    once: its keys are gathered once and hit by every query of the group in one matmul
    ("cascade" attention). Each row then attends over its private suffix, and the two partial
    softmaxes are merged by their log-sum-exp. KV traffic per step drops from
    sum(context) to prefix + sum(suffix), which is what makes many samples cheap.

    Layers may differ (spec per layer): the decode layout is built once per distinct sliding
    window among the layers. Under a window, a row shares its group's prefix only while the
    window still covers its whole context (so the prefix); longer rows read privately.

    Each pass returns its normalized output and log-sum-exp. On CPU a pass over enough keys
    runs torch's fused flash-attention kernel (no score matrix in memory, one op instead of
    ~7); shorter ones, soft-capped layers, other devices, and `fused=False` use batched
    matmuls.
    """

    # A prefix shorter than this many blocks is not worth a separate matmul.
    MIN_SHARED_BLOCKS = 2

    def __init__(
        self,
        cache: KVCache,
        meta: AttentionMetadata,
        specs: Sequence[AttentionLayerSpec],
        fused: bool = True,
    ) -> None:
        super().__init__(cache, meta, specs)
        device = cache.device
        self.fused = fused and device.type == "cpu" and _CPU_FLASH is not None
        starts = meta.query_start
        self.decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
        self.prefill = [i for i, n in enumerate(meta.query_lens) if n > 1]
        prefill_read = sum(meta.context_lens[i] for i in self.prefill)
        # Per (window, sparse layer?): the dense-read decode rows and how they read. On a
        # block top-k layer the rows that read sparsely are left out (see _decode_sparse).
        self.layouts: dict[tuple[int | None, bool], tuple[torch.Tensor, _DecodeLayout]] = {}
        sparse = set(self.sparse.rows) if self.sparse is not None else set()
        if self.sparse is not None:
            self.sparse_q_rows = torch.tensor([starts[i] for i in self.sparse.rows], device=device)
        if not self.decode:
            return
        keys = [(s.sliding_window, self._is_sparse(s)) for s in self.specs] or [(None, False)]
        for key in dict.fromkeys(keys):
            rows = [i for i in self.decode if not (key[1] and i in sparse)]
            if rows:
                q_rows = torch.tensor([starts[i] for i in rows], device=device)
                self.layouts[key] = (q_rows, self._layout(key[0], rows))
        # The cost model's per-layer KV reads: the mean over layers of what each layout reads.
        per_layer = [self.layouts[k][1] for k in keys if k in self.layouts]
        sparse_read = self.sparse.tokens_read * self.sparse_layers if self.sparse else 0
        self.kv_tokens_read = prefill_read + round(
            (sum(lay.kv_tokens_read for lay in per_layer) + sparse_read) / len(keys)
        )
        self.kv_tokens_shared = round(sum(lay.kv_tokens_shared for lay in per_layer) / len(keys))
        self.shared_groups = max((len(lay.groups) for lay in per_layer), default=0)

    def _layout(self, window: int | None, decode: list[int]) -> _DecodeLayout:
        meta, device = self.meta, self.cache.device
        bs = meta.block_size
        # Shared prefixes: group decode rows by first block; a group's prefix is the longest
        # common run of blocks that lie wholly before every member's current token.
        prefix_blocks = [0] * len(decode)
        groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        read = shared = 0
        by_first: dict[int, list[int]] = {}
        for row, i in enumerate(decode):
            if window is None or meta.context_lens[i] <= window:
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
            groups.append((torch.tensor(rows, device=device), slots.to(device)))
            read += common * bs
            shared += common * bs

        # Private suffixes, padded to the longest; padding reads the zeroed null block.
        starts_pos = [p * bs for p in prefix_blocks]
        suffix_lens = [meta.context_lens[i] - s for i, s in zip(decode, starts_pos, strict=True)]
        read += sum(suffix_lens)
        width = max(suffix_lens)
        gather = torch.full((len(decode), width), self.cache.null_slot, dtype=torch.long)
        for row, i in enumerate(decode):
            table = torch.tensor(meta.block_tables[i][prefix_blocks[row] :])
            slots = (table[:, None] * bs + torch.arange(bs)).flatten()[: suffix_lens[row]]
            gather[row, : suffix_lens[row]] = slots
        k_pos = torch.arange(width)[None, :]
        lens = torch.tensor(suffix_lens)[:, None]
        valid = k_pos < lens
        if window is not None:
            valid &= k_pos > lens - 1 - window
        bias = None
        if not bool(valid.all()):
            bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))
            bias = bias[:, None, None, :].to(device, self.cache.dtype)
        return _DecodeLayout(groups, gather.flatten().to(device), width, bias, read, shared)

    def __call__(
        self, spec: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._store(spec, k, v)
        out = torch.empty_like(q)
        sparse = self._is_sparse(spec)
        dense = self.layouts.get((spec.sliding_window, sparse))
        if dense is not None:
            rows, layout = dense
            out[rows] = self._decode(q[rows], layout, spec)
        if sparse:
            out[self.sparse_q_rows] = self._decode_sparse(q[self.sparse_q_rows], spec)
        self._prefill(q, out, spec)
        return out

    # A quantized pool's suffix is read in tiles of this many keys: each tile is gathered,
    # dequantized and attended, and tiles merge by log-sum-exp, so a step never holds a
    # full-precision copy of the whole context (only of one tile per row).
    QUANT_TILE = 512

    def _decode(
        self, q: torch.Tensor, layout: _DecodeLayout, spec: AttentionLayerSpec
    ) -> torch.Tensor:
        """q: (B, H, D) one token per row -> (B, H, D)."""
        B, H, D = q.shape
        kvh = self.cache.n_kv_heads
        g = H // kvh
        S = layout.suffix_width
        layer = spec.layer_idx
        # GQA without repeating KV: the g query heads of one KV head act as g query rows.
        qg = q.view(B, kvh, g, D)
        gather = layout.suffix_gather.view(B, S)
        tile = self.QUANT_TILE if self.cache.quantized else S
        out = lse = None
        for t0 in range(0, S, tile):
            t1 = min(S, t0 + tile)
            slots = gather[:, t0:t1].flatten() if tile < S else layout.suffix_gather
            keys = self.cache.keys(layer, slots, q.dtype).view(B, t1 - t0, kvh, D).transpose(1, 2)
            values = (
                self.cache.values(layer, slots, q.dtype).view(B, t1 - t0, kvh, D).transpose(1, 2)
            )
            bias = layout.suffix_bias
            if bias is not None and tile < S:
                bias = bias[..., t0:t1]
            # (B, KVH, G, D), (B, KVH, G)
            o, ls = self._attend(qg, keys, values, bias, spec)
            out, lse = (o, ls) if out is None else merge_partial(out, lse, o, ls)
        assert out is not None and lse is not None
        for rows, slots in layout.groups:
            # Prefix read once for the group: its R*g queries per KV head in one pass.
            R = rows.shape[0]
            qp = qg[rows].transpose(0, 1).reshape(1, kvh, R * g, D)
            kp = self.cache.keys(layer, slots, q.dtype).transpose(0, 1).unsqueeze(0)  # (1,KVH,P,D)
            vp = self.cache.values(layer, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            op, lsep = self._attend(qp, kp, vp, None, spec)
            op = op.view(kvh, R, g, D).transpose(0, 1)  # (R, KVH, G, D)
            lsep = lsep.view(kvh, R, g).transpose(0, 1)  # (R, KVH, G)
            # Both sides saw keys (the suffix holds the current token): the plain merge.
            out[rows], lse[rows] = merge_partial(out[rows], lse[rows], op, lsep, safe=False)
        return out.reshape(B, H, D).to(q.dtype)

    # Below this many keys, many tiny (batch, head) problems run faster as batched matmuls
    # than through the flash kernel's per-problem set-up; from about this many, flash wins
    # (measurements: docs/BENCHMARKS.md, "Measurements behind code choices").
    FLASH_MIN_KEYS = 48

    def _decode_sparse(self, q: torch.Tensor, spec: AttentionLayerSpec) -> torch.Tensor:
        """Block top-k rows: q (R, H, D) -> (R, H, D). Each row and KV head gathers only its
        chosen blocks (sparse.py): at most `budget` tokens, dequantized as read."""
        assert self.sparse is not None and self.cache.key_means is not None
        R, H, D = q.shape
        kvh = self.cache.n_kv_heads
        layer = spec.layer_idx
        idx, chosen = select_blocks(q, self.cache.key_means[layer], self.sparse)
        slots, inside = selected_slots(idx, chosen, self.sparse, self.cache.null_slot)
        keys = self.cache.keys_by_head(layer, slots, q.dtype)  # (R, KVH, S, D)
        values = self.cache.values_by_head(layer, slots, q.dtype)
        bias = torch.zeros(inside.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~inside, float("-inf"))[:, :, None, :]  # (R, KVH, 1, S)
        out, _ = self._attend(q.view(R, kvh, H // kvh, D), keys, values, bias, spec)
        return out.reshape(R, H, D).to(q.dtype)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        spec: AttentionLayerSpec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention without masking beyond `bias`: q (N, Hk, M, D), k and v
        (N, Hk, S, D) -> fp32 output (N, Hk, M, D) and log-sum-exp of the scores (N, Hk, M),
        which lets partial softmaxes over disjoint keys be merged."""
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        if self.fused and spec.soft_cap is None and k.shape[-2] >= self.FLASH_MIN_KEYS:
            out, lse = _CPU_FLASH(q, k, v, attn_mask=bias, scale=spec.scale)
            return out.float(), lse.float()
        # fp32 softmax whatever the KV dtype.
        scores = torch.matmul(q.float() * spec.scale, k.float().transpose(-1, -2))
        scores = soft_cap(scores, spec.soft_cap)
        if bias is not None:
            scores = scores + bias
        m = scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores - m)
        denom = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p, v.float()) / denom
        return out, (m + denom.log()).squeeze(-1)

    def _prefill(self, q: torch.Tensor, out: torch.Tensor, spec: AttentionLayerSpec) -> None:
        enable_gqa = q.shape[1] != self.cache.n_kv_heads
        starts = self.meta.query_start
        for i in self.prefill:
            start, q_len, ctx_len = starts[i], self.meta.query_lens[i], self.meta.context_lens[i]
            slots = self.meta.context_slots(i, q.device)
            # (1, KVH, S, D); a quantized pool dequantizes this sequence's context once per
            # chunk (prefill is compute-bound: the copy is small against the chunk's matmuls).
            keys = self.cache.keys(spec.layer_idx, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            values = self.cache.values(spec.layer_idx, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            qi = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
            if spec.soft_cap is not None:
                o = self._prefill_soft_capped(qi, keys, values, q_len, ctx_len, spec)
            elif q_len == ctx_len and spec.sliding_window is None:
                o = F.scaled_dot_product_attention(
                    qi, keys, values, is_causal=True, scale=spec.scale, enable_gqa=enable_gqa
                )
            else:
                mask = self._mask(q_len, ctx_len, spec.sliding_window, q.device)
                o = F.scaled_dot_product_attention(
                    qi, keys, values, attn_mask=mask, scale=spec.scale, enable_gqa=enable_gqa
                )
            out[start : start + q_len] = o.squeeze(0).transpose(0, 1)

    def _prefill_soft_capped(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_len: int,
        ctx_len: int,
        spec: AttentionLayerSpec,
    ) -> torch.Tensor:
        """SDPA cannot soft-cap scores: q (1, H, Q, D), k/v (1, KVH, S, D) -> (1, H, Q, D)."""
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = soft_cap(
            torch.matmul(q.float() * spec.scale, k.float().transpose(-1, -2)), spec.soft_cap
        )
        allowed = self._mask(q_len, ctx_len, spec.sliding_window, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def merge_partial(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    safe: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two normalized partial softmax outputs over disjoint keys, weighted by their
    total mass: out (..., D), lse (...). With `safe`, a side that saw no key (lse = -inf; its
    output may be NaN) weighs nothing."""
    if safe:  # a pass over only masked keys returns lse -inf or NaN (matmul path): no mass
        fa, fb = torch.isfinite(lse_a), torch.isfinite(lse_b)
        lse_a = torch.where(fa, lse_a, float("-inf"))
        lse_b = torch.where(fb, lse_b, float("-inf"))
    total = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - total)[..., None]
    wb = torch.exp(lse_b - total)[..., None]
    if not safe:
        return out_a * wa + out_b * wb, total
    wa = torch.where(fa[..., None], wa, 0.0)
    wb = torch.where(fb[..., None], wb, 0.0)
    out_a = torch.where(wa > 0, out_a, 0.0)
    out_b = torch.where(wb > 0, out_b, 0.0)
    return out_a * wa + out_b * wb, total
