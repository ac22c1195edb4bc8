"""Paged attention metadata: where a ragged batch's tokens live in the KV cache.

A step's batch is flat: N new tokens from S sequences in order, sequence s owning the next
query_lens[s] of them. Each new token's K/V is written at `slot_mapping` (block * block_size +
offset); sequence s then attends over its first `context_lens[s]` tokens, found through
`block_tables[s]` (padded with block 0, never read past context_lens). The lengths stay host
lists so the model plans the step (model/paged_plan.py) without device syncs. Only the runner
builds this (from Python lists); the model reads it as an explicit argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(slots=True)
class PagedMetadata:
    positions: Tensor        # (N,) absolute position of each new token
    slot_mapping: Tensor     # (N,) flat slot where each new token's K/V goes
    block_tables: Tensor     # (S, max_blocks) block ids per sequence, 0-padded
    block_size: int
    query_lens: list[int]    # (S,) new tokens per sequence
    context_lens: list[int]  # (S,) tokens visible to each sequence after this step

    @classmethod
    def build(
        cls, *, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
        block_size: int, device: torch.device | str = "cpu",
    ) -> PagedMetadata:
        """Derive positions and slots: the new tokens are the last query_lens[s] of each context."""
        positions: list[int] = []
        slots: list[int] = []
        for q_len, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 1 <= q_len <= ctx:
                raise ValueError(f"query_len={q_len} must be in [1, context_len={ctx}]")
            if len(table) * block_size < ctx:
                raise ValueError(f"block table of {len(table)} blocks cannot hold context_len={ctx}")
            for pos in range(ctx - q_len, ctx):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(positions=as_long(positions), slot_mapping=as_long(slots), block_tables=as_long(padded),
                   block_size=block_size, query_lens=list(query_lens), context_lens=list(context_lens))
