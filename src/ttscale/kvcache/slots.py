"""Position -> pool row arithmetic. A token at position p of a sequence lives at flat slot
`block_table[p // block_size] * block_size + p % block_size` of every layer's K and V."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def slot_mapping(block_table: Sequence[int], start: int, count: int, block_size: int) -> list[int]:
    """Flat slots of positions start .. start + count - 1."""
    return [
        block_table[p // block_size] * block_size + p % block_size
        for p in range(start, start + count)
    ]


def context_slots(
    block_table: Sequence[int], context_len: int, block_size: int, device: torch.device | str
) -> torch.Tensor:
    """(context_len,) flat slots of a sequence's whole context, in position order."""
    blocks = torch.tensor(list(block_table), device=device)
    slots = blocks[:, None] * block_size + torch.arange(block_size, device=device)
    return slots.flatten()[:context_len]
