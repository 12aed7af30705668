"""The layout of one step's tokens over the paged KV cache, built once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttscale.kvcache.slots import context_slots


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to.

    Sequences are laid out back to back in the flattened batch: sequence i owns query rows
    `query_start[i] : query_start[i] + query_lens[i]`, its new tokens sit at positions
    `context_lens[i] - query_lens[i] ... context_lens[i] - 1`.
    """

    slot_mapping: torch.Tensor  # (T,) flat KV slot of each new token
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    # Per sequence, the block top-k token budget of its decode rows; None: dense (the
    # request's or engine's policy, resolved by the engine). None for the list: all dense.
    kv_budgets: list[int | None] | None = None

    @property
    def query_start(self) -> list[int]:
        starts, total = [], 0
        for n in self.query_lens:
            starts.append(total)
            total += n
        return starts

    def context_slots(self, i: int, device: torch.device) -> torch.Tensor:
        """(context_lens[i],) flat slots of sequence i's whole context, in position order."""
        return context_slots(self.block_tables[i], self.context_lens[i], self.block_size, device)
