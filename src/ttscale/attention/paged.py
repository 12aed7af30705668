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
        self.decode_rows = torch.tensor([starts[i] for i in self.decode], device=device)
        prefill_read = sum(meta.context_lens[i] for i in self.prefill)
        self.layouts: dict[int | None, _DecodeLayout] = {}
        if not self.decode:
            return
        windows = [s.sliding_window for s in self.specs] or [None]
        for w in dict.fromkeys(windows):
            self.layouts[w] = self._layout(w)
        # The cost model's per-layer KV reads: the mean over layers of what each layout reads.
        per_layer = [self.layouts[w] for w in windows]
        self.kv_tokens_read = prefill_read + round(
            sum(lay.kv_tokens_read for lay in per_layer) / len(per_layer)
        )
        self.kv_tokens_shared = round(
            sum(lay.kv_tokens_shared for lay in per_layer) / len(per_layer)
        )
        self.shared_groups = max(len(lay.groups) for lay in per_layer)

    def _layout(self, window: int | None) -> _DecodeLayout:
        meta, decode, device = self.meta, self.decode, self.cache.device
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
        k_pool, v_pool = self.cache.layer(spec.layer_idx)
        if self.decode:
            layout = self.layouts[spec.sliding_window]
            out[self.decode_rows] = self._decode(q[self.decode_rows], k_pool, v_pool, layout, spec)
        self._prefill(q, out, k_pool, v_pool, spec)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        layout: _DecodeLayout,
        spec: AttentionLayerSpec,
    ) -> torch.Tensor:
        """q: (B, H, D) one token per row -> (B, H, D)."""
        B, H, D = q.shape
        kvh = k_pool.shape[1]
        g = H // kvh
        S = layout.suffix_width
        # GQA without repeating KV: the g query heads of one KV head act as g query rows.
        qg = q.view(B, kvh, g, D)
        keys = (
            self._gather(k_pool, layout.suffix_gather, q.dtype).view(B, S, kvh, D).transpose(1, 2)
        )
        values = (
            self._gather(v_pool, layout.suffix_gather, q.dtype).view(B, S, kvh, D).transpose(1, 2)
        )
        # (B, KVH, G, D), (B, KVH, G)
        out, lse = self._attend(qg, keys, values, layout.suffix_bias, spec)
        for rows, slots in layout.groups:
            # Prefix read once for the group: its R*g queries per KV head in one pass.
            R = rows.shape[0]
            qp = qg[rows].transpose(0, 1).reshape(1, kvh, R * g, D)
            kp = self._gather(k_pool, slots, q.dtype).transpose(0, 1).unsqueeze(0)  # (1, KVH, P, D)
            vp = self._gather(v_pool, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            op, lsep = self._attend(qp, kp, vp, None, spec)
            op = op.view(kvh, R, g, D).transpose(0, 1)  # (R, KVH, G, D)
            lsep = lsep.view(kvh, R, g).transpose(0, 1)  # (R, KVH, G)
            # Merge the two normalized partial softmaxes, weighted by their total mass.
            ls = lse[rows]
            total = torch.logaddexp(ls, lsep)
            weight_s = torch.exp(ls - total)[..., None]
            weight_p = torch.exp(lsep - total)[..., None]
            out[rows] = out[rows] * weight_s + op * weight_p
        return out.reshape(B, H, D).to(q.dtype)

    def _gather(self, pool: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(len(slots), KVH, D) rows of `pool` in the compute dtype (`index_select`: several
        times faster on CPU than advanced indexing). The pool's dtype may differ from the
        weights' (CacheConfig.kv_dtype): rows are converted after the gather, so only the
        rows read are."""
        rows = pool.index_select(0, slots)
        return rows if rows.dtype == dtype else rows.to(dtype)

    # Below this many keys, many tiny (batch, head) problems run faster as batched matmuls
    # than through the flash kernel's per-problem set-up; from about this many, flash wins
    # (measurements: docs/BENCHMARKS.md, "Measurements behind code choices").
    FLASH_MIN_KEYS = 48

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

    def _prefill(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        spec: AttentionLayerSpec,
    ) -> None:
        enable_gqa = q.shape[1] != k_pool.shape[1]
        starts = self.meta.query_start
        for i in self.prefill:
            start, q_len, ctx_len = starts[i], self.meta.query_lens[i], self.meta.context_lens[i]
            slots = self.meta.context_slots(i, q.device)
            keys = (
                self._gather(k_pool, slots, q.dtype).transpose(0, 1).unsqueeze(0)
            )  # (1, KVH, S, D)
            values = self._gather(v_pool, slots, q.dtype).transpose(0, 1).unsqueeze(0)
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
