"""Block top-k sparse decode attention (Kinetics, after Quest): which KV blocks a decode row
reads. One selection function, used by the fast path (which gathers only the chosen blocks)
and by the reference (which masks dense attention to them), so the two can only differ in
summation order.

A block's score for a row and KV head is (mean of the head's g query heads) . (block's mean
key) = the mean of q.k over the block and the group, Kinetics' block score. The pool keeps
each full block's mean key (`KVCache.key_means`), so scoring reads one vector per block
instead of the block's keys. Always read: the first block (attention sink), the last
`window` tokens in whole blocks, and the current block (partial or not). The rest of the
`budget` (whole blocks) goes to the best-scoring blocks, chosen per row and KV head.
Prefill chunks and rows whose context fits the budget stay dense (so budget >= context is
exactly dense attention).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ttscale.attention.spec import AttentionLayerSpec
from ttscale.kvcache.config import CacheConfig


@dataclass(frozen=True)
class BlockTopK:
    """`AttentionLayerSpec.sparsity` of a layer block top-k may sparsify. The budget is per
    row (`AttentionMetadata.kv_budgets`: requests may differ); the window is the engine's."""

    window: int  # tokens of local window always read (rounded up to whole blocks)


@dataclass
class SparseRows:
    """The decode rows of one step that read sparsely, padded into tensors once per step.

    rows: indices into the step's sequences; tables (R, N) physical blocks, null-padded;
    num_blocks (R,) blocks each row's context spans; keep (R,) blocks each may read;
    forced (R, N) blocks always read; valid (R, N) blocks inside the context.
    """

    rows: list[int]
    tables: torch.Tensor
    num_blocks: torch.Tensor
    context_lens: torch.Tensor
    keep: torch.Tensor
    forced: torch.Tensor
    valid: torch.Tensor
    block_size: int

    @property
    def max_keep(self) -> int:
        return int(self.keep.max())

    @property
    def tokens_read(self) -> int:
        """KV tokens these rows read per sparse layer: whole chosen blocks, less the unused
        tail of the current block."""
        unused = self.num_blocks * self.block_size - self.context_lens
        return int((self.keep * self.block_size - unused).sum())


def sparse_row_indices(
    query_lens: list[int], context_lens: list[int], budgets: list[int | None]
) -> list[int]:
    """The sequences whose row reads block top-k this step: decode rows (one query token)
    whose context exceeds their budget; the rest stay dense, so budget >= context is exactly
    dense attention. One rule for every backend (base.py, models/fused.py)."""
    return [
        i
        for i, (q, c, b) in enumerate(zip(query_lens, context_lens, budgets, strict=True))
        if q == 1 and b is not None and c > b
    ]


def kept_tokens(context: int, budget: int, block_size: int) -> int:
    """Context tokens a block top-k row reads per sparse layer: its kept whole blocks, less
    the unwritten tail of the current block (`SparseRows.tokens_read` for one row)."""
    blocks = -(-context // block_size)
    return min(budget // block_size, blocks) * block_size - (blocks * block_size - context)


def sparse_rows(
    rows: list[int],
    block_tables: list[list[int]],
    context_lens: list[int],
    budgets: list[int],
    block_size: int,
    window: int,
    null_block: int,
    device: torch.device,
) -> SparseRows:
    """Pads the given rows' tables and states what each must, may and can read."""
    bs = block_size
    nblk = [-(-context_lens[i] // bs) for i in rows]
    width = max(nblk)
    tables = torch.full((len(rows), width), null_block, dtype=torch.long)
    for r, i in enumerate(rows):
        tables[r, : nblk[r]] = torch.tensor(block_tables[i][: nblk[r]])
    n = torch.tensor(nblk)
    pos = torch.arange(width)[None, :]
    window_blocks = -(-window // bs)
    forced = (pos == 0) | (pos >= n[:, None] - 1 - window_blocks)
    valid = pos < n[:, None]
    keep = torch.minimum(torch.tensor([budgets[i] // bs for i in rows]), n)
    ctx = torch.tensor([context_lens[i] for i in rows])
    return SparseRows(
        list(rows),
        tables.to(device),
        n.to(device),
        ctx.to(device),
        keep.to(device),
        (forced & valid).to(device),
        valid.to(device),
        bs,
    )


def select_blocks(
    q: torch.Tensor, key_means: torch.Tensor, rows: SparseRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each row and KV head reads.

    q (R, H, D) the rows' queries; key_means (num_blocks + 1, KVH, D) one layer's block mean
    keys. Returns logical block indices (R, KVH, K) and whether each is chosen (R, KVH, K),
    K = rows.max_keep (a row with a smaller budget leaves its lowest-ranked picks unchosen).
    """
    R, H, D = q.shape
    kvh = key_means.shape[1]
    q_mean = q.float().view(R, kvh, H // kvh, D).mean(dim=2)  # (R, KVH, D)
    N = rows.tables.shape[1]
    means = key_means.index_select(0, rows.tables.flatten()).view(R, N, kvh, D)
    scores = torch.einsum("rkd,rnkd->rkn", q_mean, means)  # (R, KVH, N)
    scores = scores.masked_fill(rows.forced[:, None, :], float("inf"))
    scores = scores.masked_fill(~rows.valid[:, None, :], float("-inf"))
    K = rows.max_keep
    top, idx = scores.topk(K, dim=-1)  # sorted: forced blocks rank first
    rank = torch.arange(K, device=q.device)
    chosen = (top > float("-inf")) & (rank[None, None, :] < rows.keep[:, None, None])
    return idx, chosen


def selected_slots(
    idx: torch.Tensor, chosen: torch.Tensor, rows: SparseRows, null_slot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pool slots (R, KVH, K * bs) of the chosen blocks, and which of them hold a
    context token. The others (an unchosen pick, the unwritten tail of the current block)
    read the zeroed null slot instead: masked garbage could be NaN, and 0 * NaN = NaN."""
    R, kvh, K = idx.shape
    bs = rows.block_size
    phys = rows.tables.gather(1, idx.reshape(R, kvh * K)).view(R, kvh, K)
    offsets = torch.arange(bs, device=idx.device)
    slots = (phys[..., None] * bs + offsets).view(R, kvh, K * bs)
    pos = (idx[..., None] * bs + offsets).view(R, kvh, K * bs)
    inside = pos < rows.context_lens[:, None, None]
    inside &= chosen[..., None].expand(R, kvh, K, bs).reshape(R, kvh, K * bs)
    return torch.where(inside, slots, null_slot), inside


def selection_mask(
    q: torch.Tensor, key_means: torch.Tensor, rows: SparseRows, row: int, context_len: int
) -> torch.Tensor:
    """(KVH, context_len) bool: which positions row `row` (of `rows`) reads, the reference's
    view of the same selection."""
    one = SparseRows(
        [rows.rows[row]],
        *(t[row : row + 1] for t in (rows.tables, rows.num_blocks, rows.context_lens)),
        rows.keep[row : row + 1],
        rows.forced[row : row + 1],
        rows.valid[row : row + 1],
        rows.block_size,
    )
    idx, chosen = select_blocks(q, key_means, one)
    kvh = key_means.shape[1]
    blocks = torch.zeros(kvh, rows.tables.shape[1] + 1, dtype=torch.bool, device=q.device)
    # Unchosen picks go to a spare column past the end.
    spare = torch.full_like(idx[0], rows.tables.shape[1])
    blocks.scatter_(1, torch.where(chosen[0], idx[0], spare), True)
    per_token = blocks[:, :-1].repeat_interleave(rows.block_size, dim=1)
    return per_token[:, :context_len]


def with_block_topk(
    specs: list[AttentionLayerSpec], config: CacheConfig
) -> list[AttentionLayerSpec]:
    """The model's layer specs with the engine's block top-k policy on every layer it may
    sparsify: not in `config.sparse_dense_layers`, not windowed (a window is already a
    budget). Unchanged when the engine is dense."""
    if config.sparse_attention != "block_topk":
        return list(specs)
    policy = BlockTopK(config.sparse_window)
    dense = set(config.sparse_dense_layers)
    return [
        s if s.layer_idx in dense or s.sliding_window is not None else replace(s, sparsity=policy)
        for s in specs
    ]
