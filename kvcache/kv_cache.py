"""KV storage: the torch side of the paged cache, sized from a byte budget.

K and V are one tensor each with a layer axis: (n_layers, num_blocks, n_kv_heads, block_size,
head_dim), in the model's dtype and on its device: one K/V head's page is a contiguous slab, so
attention gathers whole slabs into per-head contiguous keys (model/paged_plan.py). The byte budget buys whole data blocks; one
more block, block 0, is the null block beside the budget: the block pool never hands it out and
block tables are padded with it. So capacities compare exactly across variants: at a budget that
is a multiple of MHA's block, MQA holds exactly n_heads times MHA's tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12, "t": 10**12}


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MiB', '2GB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"invalid size {text!r}: use a number with a unit such as 512MiB, 1GiB or 2GB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The footprint arithmetic of one attention variant; no tensors."""
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks(self, budget_bytes: int) -> int:
        """Data blocks that fit in the budget (the null block comes on top)."""
        return budget_bytes // self.bytes_per_block

    def capacity_tokens(self, budget_bytes: int) -> int:
        """Tokens the budget's blocks hold."""
        return self.num_blocks(budget_bytes) * self.block_size


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype, device: torch.device | str):
        """num_blocks counts the null block: num_blocks - 1 blocks store tokens."""
        if num_blocks < 2:
            raise ValueError(
                f"KV budget holds {num_blocks - 1} blocks of {layout.bytes_per_block} bytes; need at least 1: "
                "raise kv_cache_memory"
            )
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (layout.n_layers, num_blocks, layout.n_kv_heads, layout.block_size, layout.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, cfg, *, budget_bytes: int, block_size: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.finfo(dtype).bits // 8, block_size)
        return cls(layout, layout.num_blocks(budget_bytes) + 1, dtype, device)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.layout.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
