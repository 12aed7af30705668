"""Executes one scheduled step on the model: flatten tokens, copy-on-write, forward, logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttscale.attention.paged import (
    AttentionMetadata,
    KVCache,
    PagedAttention,
    ReferencePagedAttention,
)
from ttscale.cost.model import StepShape
from ttscale.engine.scheduler import SchedulerOutput

ATTENTION_BACKENDS = {"fast": PagedAttention, "reference": ReferencePagedAttention}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_gb: float | None = None  # None: a fraction of free memory, capped (see below)
    kv_cache_memory_fraction: float = 0.25
    kv_cache_max_gb_default: float = 2.0  # cap of the fraction rule on CPU, where RAM is shared
    enable_prefix_caching: bool = True
    attention: str = "fast"  # "fast" | "reference"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be > 0")
        if not 0 < self.kv_cache_memory_fraction < 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1)")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_BACKENDS)}")


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


class ModelRunner:
    """Owns the model and the KV tensors. Stateless between steps apart from the cache."""

    def __init__(self, model: torch.nn.Module, config: CacheConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        mc = model.config
        dtype = next(model.parameters()).dtype
        block_bytes = KVCache.bytes_per_block(
            mc.num_hidden_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype
        )
        if config.kv_cache_gb is not None:
            budget = config.kv_cache_gb * 2**30
        else:
            budget = free_memory_bytes(device) * config.kv_cache_memory_fraction
            if device.type == "cpu":
                budget = min(budget, config.kv_cache_max_gb_default * 2**30)
        self.num_blocks = int(budget // block_bytes)
        if self.num_blocks < 2:
            raise ValueError(
                f"KV cache budget {budget / 2**30:.3f} GiB holds {self.num_blocks} blocks of "
                f"{block_bytes} bytes; at least 2 are needed: raise kv_cache_gb (or "
                "kv_cache_memory_fraction)"
            )
        self.kv_cache = KVCache(
            mc.num_hidden_layers,
            self.num_blocks,
            config.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
            dtype,
            device,
        )
        self.attention_cls = ATTENTION_BACKENDS[config.attention]
        self.scale = mc.head_dim**-0.5
        # What the last step computed and read, for the cost model.
        self.last_step: StepShape | None = None

    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        """Runs the step; returns fp32 logits (num sampled seqs, vocab) in batch.seqs order."""
        self.kv_cache.copy_blocks(batch.block_copies)
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for s in batch.seqs:
            n = len(s.token_ids)
            input_ids += s.token_ids
            pos = range(s.start_pos, s.start_pos + n)
            positions += pos
            table = s.block_table
            slots += [table[p // bs] * bs + p % bs for p in pos]
            if s.sample:
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            query_lens=[len(s.token_ids) for s in batch.seqs],
            context_lens=[s.start_pos + len(s.token_ids) for s in batch.seqs],
            block_tables=[s.block_table for s in batch.seqs],
            block_size=bs,
        )
        attn = self.attention_cls(self.kv_cache, meta, self.scale, self.model.config.sliding_window)
        self.last_step = StepShape(
            query_lens=tuple(meta.query_lens),
            context_lens=tuple(meta.context_lens),
            kv_tokens_read=attn.kv_tokens_read,
            num_logits=len(sample_rows),
            kv_tokens_shared=attn.kv_tokens_shared,
            shared_groups=attn.shared_groups,
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            attn,
        )
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
