"""Attention over the paged KV cache, for a flat ragged batch of new tokens.

    fn(q[N, Hq, D], k_cache[num_blocks, block_size, Hkv, D], v_cache[...], meta) -> [N, Hq, D]

The new tokens' K/V are already written into the cache (see `write_kv`). Sequence s's queries are
its last query_lens[s] positions; they attend causally over its first context_lens[s] tokens.

- `paged_flash_attention` walks each sequence's pages as key/value tiles: a tile is a few
  consecutive pages of the block table, gathered one tile at a time into a reused buffer (never a
  whole context), with the online softmax across tiles and the partial last page masked. Decodes
  (one new token) of all sequences advance together tile by tile, longest context first, so a tile
  only gathers pages that some sequence still needs; prefill chunks go one sequence at a time,
  tiled over queries too. Query heads are grouped over their K/V head as in `flash_attention`.
- `paged_sdpa_attention` and `paged_naive_attention` first gather each sequence's whole context
  into a contiguous buffer and call the contiguous function: the references.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcache.metadata import PagedMetadata
from model.attention import naive_attention, sdpa_attention
from model.flash_tiles import DEFAULT_BLOCK_Q, LOG2E, CausalBias, OnlineSoftmax, compute_dtype

# Keys per tile: for 32 decoding sequences of SmolLM2 (3 K/V heads) one float32 K tile is 6 MB,
# so K, V and the scores of a tile stay in this CPU's 32 MB L3 while the loop makes few torch calls.
DEFAULT_TILE_TOKENS = 256


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store the new tokens' K/V (N, Hkv, D) at their slots."""
    Hkv, D = k.shape[1], k.shape[2]
    k_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, v)


class _PageTiles:
    """Reusable buffers into which a tile's pages are gathered (and cast to the compute dtype).

    index_select on whole blocks is a row memcpy, ~20x faster than advanced indexing; writing into
    the same buffers every tile avoids page-faulting fresh memory (costly on this VM).
    """

    __slots__ = ("k_cache", "v_cache", "dtype", "_raw", "_cast")

    def __init__(self, k_cache: Tensor, v_cache: Tensor, max_pages: int, dtype: torch.dtype):
        self.k_cache, self.v_cache, self.dtype = k_cache, v_cache, dtype
        numel = max_pages * k_cache[0].numel()
        self._raw = [torch.empty(numel, dtype=k_cache.dtype, device=k_cache.device) for _ in range(2)]
        self._cast = ([torch.empty(numel, dtype=dtype, device=k_cache.device) for _ in range(2)]
                      if dtype != k_cache.dtype else None)

    def gather(self, pages: Tensor) -> tuple[Tensor, Tensor]:
        """pages (P,) block ids -> K, V of shape (P * block_size, Hkv, D) in the compute dtype."""
        page_shape = self.k_cache.shape[1:]
        numel = pages.numel() * self.k_cache[0].numel()
        tiles = []
        for i, cache in enumerate((self.k_cache, self.v_cache)):
            tile = torch.index_select(cache, 0, pages, out=self._raw[i][:numel].view(-1, *page_shape))
            if self._cast is not None:
                tile = self._cast[i][:numel].view_as(tile).copy_(tile)
            tiles.append(tile.flatten(0, 1))
        return tiles[0], tiles[1]


def _paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                  context_lens: list[int], tile_tokens: int) -> Tensor:
    """q (S, Hq, D), one query per sequence at its last position -> (S, Hq, D).

    Sequences must come sorted by context length, longest first: the ones still reading at a tile
    are then a prefix of the batch, and the tile gathers only their pages.
    """
    S, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    dtype = compute_dtype(q.dtype)
    device = q.device
    q_h = torch.empty(Hkv, S, group, D, dtype=dtype, device=device)  # heads of a K/V head together
    torch.mul(q.view(S, Hkv, group, D).transpose(0, 1), LOG2E / math.sqrt(D), out=q_h)
    pages_per_tile = max(1, tile_tokens // block_size)
    n_pages = -(-context_lens[0] // block_size)
    tile_len = min(pages_per_tile, n_pages) * block_size
    tiles = _PageTiles(k_cache, v_cache, S * min(pages_per_tile, n_pages), dtype)
    scores_buf = torch.empty(Hkv * S * group * tile_len, dtype=dtype, device=device)
    m = torch.empty(Hkv, S, group, 1, dtype=dtype, device=device)
    l = torch.empty_like(m)
    acc = torch.empty(Hkv, S, group, D, dtype=dtype, device=device)
    OnlineSoftmax.start(m, l, acc)
    lens = torch.tensor(context_lens, device=device)
    n = S
    for p0 in range(0, n_pages, pages_per_tile):
        t0 = p0 * block_size
        while context_lens[n - 1] <= t0:  # sequences whose context ended before this tile are done
            n -= 1
        p1 = min(p0 + pages_per_tile, n_pages)
        L = (p1 - p0) * block_size
        k, v = tiles.gather(block_tables[:n, p0:p1].reshape(-1))
        k, v = k.view(n, L, Hkv, D), v.view(n, L, Hkv, D)
        scores = scores_buf[:Hkv * n * group * L].view(Hkv, n, group, L)
        for h in range(Hkv):
            torch.bmm(q_h[h, :n], k[:, :, h].transpose(1, 2), out=scores[h])  # (n, G, L)
        if context_lens[n - 1] < t0 + L:  # a context ends inside the tile: mask the rest of its last page
            beyond = torch.arange(t0, t0 + L, device=device)[None, :] >= lens[:n, None]  # (n, L)
            scores.masked_fill_(beyond[None, :, None, :], float("-inf"))
        state = OnlineSoftmax(m[:, :n], l[:, :n], acc[:, :n])
        probs = state.absorb(scores)
        for h in range(Hkv):
            state.acc[h].baddbmm_(probs[h], v[:, :, h])  # (n, G, D)
    out = torch.empty(S, Hkv, group, D, dtype=q.dtype, device=device)
    OnlineSoftmax(m, l, acc).result_into(out.transpose(0, 1))
    return out.view(S, Hq, D)


def _paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_len: int,
                   out: Tensor, tile_tokens: int, block_q: int) -> None:
    """q (Tq, Hq, D) for the last Tq positions of one sequence; writes attention into out (Tq, Hq, D)."""
    Tq, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    offset = context_len - Tq  # absolute position of query 0
    dtype = compute_dtype(q.dtype)
    q_rows = torch.empty(Hkv, Tq, group, D, dtype=dtype, device=q.device)  # rows (t, g) per K/V head
    torch.mul(q.view(Tq, Hkv, group, D).transpose(0, 1), LOG2E / math.sqrt(D), out=q_rows)
    q_rows = q_rows.view(Hkv, Tq * group, D)
    out_rows = out.view(Tq, Hkv, group, D).transpose(0, 1)  # (Hkv, Tq, G, D) view
    pages_per_tile = max(1, tile_tokens // block_size)
    max_rows = min(block_q, Tq) * group
    max_pages = min(pages_per_tile, -(-context_len // block_size))
    tiles = _PageTiles(k_cache, v_cache, max_pages, dtype)
    scores_buf = torch.empty(Hkv * max_rows * max_pages * block_size, dtype=dtype, device=q.device)
    m_buf = torch.empty(Hkv * max_rows, dtype=dtype, device=q.device)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(Hkv * max_rows * D, dtype=dtype, device=q.device)
    bias = CausalBias(group, dtype, q.device)
    for qs in range(0, Tq, block_q):
        qe = min(qs + block_q, Tq)
        rows = (qe - qs) * group
        q_tile = q_rows[:, qs * group:qe * group]  # (Hkv, rows, D)
        state = OnlineSoftmax.start(m_buf[:Hkv * rows].view(Hkv, rows, 1), l_buf[:Hkv * rows].view(Hkv, rows, 1),
                                    acc_buf[:Hkv * rows * D].view(Hkv, rows, D))
        k_end = offset + qe  # the tile's last query sees keys < k_end; later pages are skipped
        n_pages = -(-k_end // block_size)
        for p0 in range(0, n_pages, pages_per_tile):
            p1 = min(p0 + pages_per_tile, n_pages)
            t0, L = p0 * block_size, (p1 - p0) * block_size
            k, v = tiles.gather(block_table[p0:p1])  # (L, Hkv, D)
            scores = scores_buf[:Hkv * rows * L].view(Hkv, rows, L)
            k_t = k.permute(1, 2, 0)  # (Hkv, D, L), a strided view the matmul reads in place
            if t0 + L - 1 > offset + qs:  # the tile crosses the diagonal (or holds the partial last page)
                torch.baddbmm(bias.get(rows, L, offset + qs - t0), q_tile, k_t, out=scores)
            else:
                torch.bmm(q_tile, k_t, out=scores)
            state.update(scores, v.transpose(0, 1))
        state.result_into(out_rows[:, qs:qe])


def paged_flash_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedMetadata, *,
                          tile_tokens: int = DEFAULT_TILE_TOKENS, block_q: int = DEFAULT_BLOCK_Q) -> Tensor:
    out = torch.empty_like(q)
    offsets = _host_offsets(meta)
    decodes = [s for s, q_len in enumerate(meta.query_lens) if q_len == 1]
    if decodes:
        decodes.sort(key=meta.context_lens_host.__getitem__, reverse=True)
        seqs = torch.tensor(decodes, device=q.device)
        rows = torch.tensor([offsets[s] for s in decodes], device=q.device)
        out[rows] = _paged_decode(q[rows], k_cache, v_cache, meta.block_tables[seqs],
                                  [meta.context_lens_host[s] for s in decodes], tile_tokens)
    for s, q_len in enumerate(meta.query_lens):
        if q_len > 1:
            lo, hi = offsets[s], offsets[s + 1]
            _paged_prefill(q[lo:hi], k_cache, v_cache, meta.block_tables[s], meta.context_lens_host[s],
                           out[lo:hi], tile_tokens, block_q)
    return out


def _host_offsets(meta: PagedMetadata) -> list[int]:
    offsets = [0]
    for q_len in meta.query_lens:
        offsets.append(offsets[-1] + q_len)
    return offsets


def gather_context(cache: Tensor, block_table: Tensor, context_len: int) -> Tensor:
    """One sequence's first context_len tokens of a cache as a contiguous (context_len, Hkv, D)."""
    block_size = cache.shape[1]
    n_pages = -(-context_len // block_size)
    return cache.index_select(0, block_table[:n_pages]).flatten(0, 1)[:context_len]


def _paged_by_gathering(attn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedMetadata) -> Tensor:
        out = torch.empty_like(q)
        offsets = _host_offsets(meta)
        for s, ctx in enumerate(meta.context_lens_host):
            lo, hi = offsets[s], offsets[s + 1]
            k = gather_context(k_cache, meta.block_tables[s], ctx).transpose(0, 1)[None]  # (1, Hkv, Tk, D)
            v = gather_context(v_cache, meta.block_tables[s], ctx).transpose(0, 1)[None]
            out[lo:hi] = attn(q[lo:hi].transpose(0, 1)[None], k, v, causal=True)[0].transpose(0, 1)
        return out
    return paged


paged_naive_attention = _paged_by_gathering(naive_attention)
_paged_sdpa_per_sequence = _paged_by_gathering(sdpa_attention)


def paged_sdpa_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedMetadata) -> Tensor:
    """Gather-then-SDPA. Decodes are gathered into one padded batch with a length mask."""
    if meta.prefill_seqs or not meta.decode_seqs.numel():
        return _paged_sdpa_per_sequence(q, k_cache, v_cache, meta)
    S, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    max_context = max(meta.context_lens_host)
    n_pages = -(-max_context // block_size)
    pages = meta.block_tables[:, :n_pages].reshape(-1)
    k = k_cache.index_select(0, pages).view(S, n_pages * block_size, Hkv, D).transpose(1, 2)  # (S, Hkv, L, D)
    v = v_cache.index_select(0, pages).view(S, n_pages * block_size, Hkv, D).transpose(1, 2)
    k_pos = torch.arange(n_pages * block_size, device=q.device)
    mask = (k_pos[None, :] < meta.context_lens[:, None])[:, None, None, :]  # (S, 1, 1, L)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=Hq != Hkv)
    return out[:, :, 0]


PAGED_ATTENTION_IMPLS: dict[str, Callable[..., Tensor]] = {
    "flash": paged_flash_attention,
    "sdpa": paged_sdpa_attention,
    "naive": paged_naive_attention,
}
