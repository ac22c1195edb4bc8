"""The plan of one step's paged attention: every index, mask and table derived from the batch,
built once per step and read by all layers.

Cache layout (per layer): K and V are (num_blocks, Hkv, block_size, D), so one page of one K/V
head is a contiguous (block_size, D) slab. Viewed as (num_blocks * Hkv, block_size, D), slab
`block * Hkv + h` is head h of a block; gathering slabs in (sequence, head, page) order yields
(S * Hkv, L, D): every head's keys contiguous, ready for one batched matmul over all heads.

- `write_rows` (N * Hkv,): where each new token's K/V heads go, rows of the cache viewed (-1, D).
- Decodes (sequences with one new token) share one pass: `decode_tiles` cut their contexts into
  key tiles of at most `decode_tile_tokens`; each tile lists the slabs of the sequences still
  reading there (`index`) and an additive mask (0 / -inf) for the keys past a context's end.
  With several tiles the decodes are sorted longest first, so a tile's readers are a prefix of
  the batch; `decode_rows` (None when the decodes are the whole batch in order) maps them back.
  On CPU a single tile also lists each query head's key rows (`rows`), so the value product
  reads V straight from the cache (see model/paged_attention.py) instead of gathering it.
- Prefills (several new tokens) go one sequence at a time: key tiles of `prefill_tile_tokens`,
  each with its slab list; `causal` builds the diagonal masks once per step for all layers.
- `cos` / `sin` (N, 1, D): rotary rows of the new tokens in the model's dtype.
- `buffers`: the gather buffers, allocated by the first layer and reused by the others.
- `seq_of_token` (N,): each new token's sequence, all the C++ kernel needs beside the metadata's
  positions and block tables; built with `kernel=True`, the plan skips the tiles above.
Not here: the attention arithmetic (model/paged_attention.py) and the runner's lists
(kvcache/metadata.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvcache.metadata import PagedMetadata
from model.flash_tiles import CausalBias, compute_dtype

# Tiles of 2048 keys: one tile covers every context of the benchmarks' decodes (one gather, one
# softmax, no online rescaling); 32 x 2048 float32 keys x 3 heads is 50 MB, so longer contexts
# go tile by tile. Prefill keeps 256-key tiles: its scores are (tokens x group) rows wide.
DEFAULT_DECODE_TILE_TOKENS = 2048
DEFAULT_PREFILL_TILE_TOKENS = 256


class StepBuffers:
    """Gather buffers reused by every layer of a step (fresh multi-MB buffers in each layer
    page-fault on this VM); a gather casts to the compute dtype when the cache's differs."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def _buffer(self, name: str, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._buffers[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def gather(self, name: str, cache: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
        """cache (num_blocks, Hkv, bs, D), index (n,) slab ids -> (n * bs, D) in dtype."""
        bs, D = cache.shape[-2], cache.shape[-1]
        raw = self._buffer(name, index.numel() * bs * D, cache.device, cache.dtype).view(-1, bs, D)
        torch.index_select(cache.view(-1, bs, D), 0, index, out=raw)
        if dtype != cache.dtype:
            raw = self._buffer(name + "-cast", raw.numel(), cache.device, dtype).view_as(raw).copy_(raw)
        return raw.view(-1, D)


@dataclass(slots=True)
class DecodeTile:
    n: int                # sequences (a prefix of the decode batch) reading keys in this tile
    t0: int               # position of the tile's first key
    length: int           # keys gathered: whole pages
    index: Tensor         # (n * Hkv * pages,) slabs to gather
    bias: Tensor | None   # (n * Hkv, 1, length) 0 / -inf past each context's end; None: nothing to mask
    rows: Tensor | None = None  # (n * Hq, length) cache rows (viewed (-1, D)) each query head reads,
                                # for the value product without a gather (CPU, single tile); else None


@dataclass(slots=True)
class PrefillSeq:
    lo: int                       # rows lo:hi of the batch are this sequence's new tokens
    hi: int
    context_len: int
    tiles: list[tuple[int, Tensor]]  # (first key position, slabs (Hkv * pages,)) per key tile


@dataclass(slots=True)
class PagedPlan:
    n_kv_heads: int
    block_size: int
    dtype: torch.dtype            # compute dtype of attention
    write_rows: Tensor            # (N * Hkv,)
    num_decodes: int
    decode_rows: Tensor | None    # (Sd,) batch rows of the decodes in tile order; None: all rows, in order
    decode_tiles: list[DecodeTile]
    prefills: list[PrefillSeq]
    causal: CausalBias
    cos: Tensor                   # (N, 1, D) model dtype
    sin: Tensor
    max_position: int
    meta: PagedMetadata           # what the plan was built from (the gathering references read it)
    seq_of_token: Tensor          # (N,) each new token's sequence
    buffers: StepBuffers = field(default_factory=StepBuffers)

    @classmethod
    def build(cls, meta: PagedMetadata, *, n_kv_heads: int, group: int, dtype: torch.dtype,
              rope: tuple[Tensor, Tensor] | None = None,
              decode_tile_tokens: int | None = DEFAULT_DECODE_TILE_TOKENS,
              prefill_tile_tokens: int = DEFAULT_PREFILL_TILE_TOKENS, value_rows: bool = True,
              kernel: bool = False) -> PagedPlan:
        """rope: the model's (max_seq_len, D) float32 cos / sin tables (None: no rotary rows,
        for attention-only callers). decode_tile_tokens None: each context in one tile.
        value_rows: a single CPU decode tile lists its V rows (only the flash form reads them).
        kernel: for the C++ kernel alone: no tiles."""
        device, bs, Hkv = meta.positions.device, meta.block_size, n_kv_heads
        heads = torch.arange(Hkv, device=device)
        slots = meta.slot_mapping
        write_rows = (((slots // bs) * Hkv)[:, None] + heads[None, :]) * bs + (slots % bs)[:, None]  # (N, Hkv)

        offsets = [0]
        for q_len in meta.query_lens:
            offsets.append(offsets[-1] + q_len)
        decodes = [s for s, q_len in enumerate(meta.query_lens) if q_len == 1 and not kernel]
        lens = meta.context_lens
        if decode_tile_tokens is None:  # whole contexts: as many pages as the longest needs
            pages_per_tile = -(-max([lens[s] for s in decodes], default=1) // bs)
        else:
            pages_per_tile = max(1, decode_tile_tokens // bs)
        if decodes and max(lens[s] for s in decodes) > pages_per_tile * bs:
            decodes.sort(key=lens.__getitem__, reverse=True)  # several tiles: longest first
        all_rows = len(decodes) == len(offsets) - 1 and decodes == list(range(len(decodes)))
        decode_rows = None if all_rows else torch.tensor([offsets[s] for s in decodes], dtype=torch.long, device=device)
        cdtype = compute_dtype(dtype)
        row_group = group if value_rows and device.type == "cpu" else 0
        decode_tiles = _decode_tiles(meta, decodes, Hkv, pages_per_tile, cdtype, row_group) if decodes else []

        prefills = []
        prefill_pages = max(1, prefill_tile_tokens // bs)
        for s, q_len in enumerate(meta.query_lens):
            if q_len == 1 or kernel:
                continue
            n_pages = -(-lens[s] // bs)
            table = meta.block_tables[s, :n_pages]
            tiles = [(p0 * bs, _slabs(table[p0:p0 + prefill_pages], heads)) for p0 in range(0, n_pages, prefill_pages)]
            prefills.append(PrefillSeq(offsets[s], offsets[s + 1], lens[s], tiles))

        max_position = max(lens) - 1
        if rope is not None:
            if max_position >= rope[0].shape[0]:
                raise ValueError(f"position {max_position} beyond max_seq_len={rope[0].shape[0]}")
            cos = rope[0][meta.positions].to(dtype).unsqueeze(1)  # (N, 1, D)
            sin = rope[1][meta.positions].to(dtype).unsqueeze(1)
        else:
            cos = sin = torch.empty(0, device=device)
        return cls(n_kv_heads=Hkv, block_size=bs, dtype=cdtype, write_rows=write_rows.reshape(-1),
                   num_decodes=len(decodes), decode_rows=decode_rows, decode_tiles=decode_tiles,
                   prefills=prefills, causal=CausalBias(group, cdtype, device), cos=cos, sin=sin,
                   max_position=max_position, meta=meta, seq_of_token=_seq_of_token(meta))


def _seq_of_token(meta: PagedMetadata) -> Tensor:
    lens = torch.tensor(meta.query_lens, dtype=torch.long, device=meta.positions.device)
    return torch.repeat_interleave(torch.arange(len(meta.query_lens), device=lens.device), lens)


def _slabs(pages: Tensor, heads: Tensor) -> Tensor:
    """pages (..., P) block ids -> slab ids (..., Hkv, P) flattened: head-major within a sequence."""
    return (pages.unsqueeze(-2) * heads.numel() + heads[:, None]).reshape(-1)


def _value_rows(slabs: Tensor, length: int, bs: int, group: int) -> Tensor:
    """slabs (n * Hkv * pages,) in (sequence, head, page) order -> (n * Hkv * group, length) cache
    rows (the cache viewed (-1, D)) of every key, once per query head of the key's group."""
    rows = (slabs.view(-1, 1) * bs + torch.arange(bs, device=slabs.device)).view(-1, 1, length)  # (n * Hkv, 1, L)
    return rows.expand(-1, group, length).reshape(-1, length)


def _decode_tiles(meta: PagedMetadata, decodes: list[int], Hkv: int, pages_per_tile: int,
                  dtype: torch.dtype, value_rows: int) -> list[DecodeTile]:
    """value_rows: the query heads per K/V head when a single tile should carry its value rows, else 0."""
    device, bs = meta.positions.device, meta.block_size
    lens = [meta.context_lens[s] for s in decodes]
    heads = torch.arange(Hkv, device=device)
    tables = meta.block_tables[torch.tensor(decodes, device=device)]  # (Sd, max_blocks)
    lens_t = torch.tensor(lens, device=device)
    n_pages = -(-max(lens) // bs)
    tiles, n = [], len(decodes)
    for p0 in range(0, n_pages, pages_per_tile):
        t0 = p0 * bs
        while lens[n - 1] <= t0:  # sequences whose context ended before this tile are done
            n -= 1
        p1 = min(p0 + pages_per_tile, n_pages)
        length = (p1 - p0) * bs
        bias = None
        if min(lens[:n]) < t0 + length:  # some context ends inside the tile: mask its tail
            beyond = torch.arange(t0, t0 + length, device=device)[None, :] >= lens_t[:n, None]  # (n, L)
            bias = torch.zeros(n, length, dtype=dtype, device=device).masked_fill_(beyond, float("-inf"))
            bias = bias.repeat_interleave(Hkv, dim=0).unsqueeze(1)  # (n * Hkv, 1, L)
        slabs = _slabs(tables[:n, p0:p1], heads)
        rows = _value_rows(slabs, length, bs, value_rows) if value_rows and n_pages <= pages_per_tile else None
        tiles.append(DecodeTile(n, t0, length, slabs, bias, rows))
    return tiles
