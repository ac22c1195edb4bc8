"""Attention over the paged KV cache, for a flat ragged batch of new tokens.

    fn(q[N, Hq, D], k_cache[num_blocks, block_size, Hkv, D], v_cache[...], meta) -> [N, Hq, D]

The new tokens' K/V are already written into the cache (see `write_kv`). Sequence s's queries are
its last query_lens[s] positions; they attend causally over its first context_lens[s] tokens.

- `paged_flash_attention` walks each sequence's pages as key/value tiles (a tile is a few
  consecutive pages of the block table, gathered one tile at a time), with the online softmax
  across tiles and the partial last page masked. Decodes (one new token) of all sequences advance
  together tile by tile; prefill chunks go one sequence at a time, tiled over queries too.
- `paged_sdpa_attention` and `paged_naive_attention` first gather each sequence's whole context
  into a contiguous buffer and call the contiguous function: the references.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcache.metadata import PagedMetadata
from model.attention import DEFAULT_BLOCK_Q, OnlineSoftmax, causal_mask, naive_attention, sdpa_attention

DEFAULT_TILE_TOKENS = 256


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store the new tokens' K/V (N, Hkv, D) at their slots."""
    Hkv, D = k.shape[1], k.shape[2]
    k_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, v)


def _pages_per_tile(block_size: int, tile_tokens: int) -> int:
    return max(1, tile_tokens // block_size)


def _paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                  context_lens: Tensor, max_context: int, tile_tokens: int) -> Tensor:
    """q (S, Hq, D), one query per sequence at its last position -> (S, Hq, D)."""
    S, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    q_g = (q * (1.0 / math.sqrt(D))).view(S, Hkv, group, D)
    state = OnlineSoftmax((S, Hkv, group), D, q.device)
    step = _pages_per_tile(block_size, tile_tokens)
    n_pages = -(-max_context // block_size)
    for p0 in range(0, n_pages, step):
        pages = block_tables[:, p0:min(p0 + step, n_pages)]  # (S, P)
        tile_len = pages.shape[1] * block_size
        k_tile = k_cache[pages].view(S, tile_len, Hkv, D).permute(0, 2, 3, 1)  # (S, Hkv, D, L)
        v_tile = v_cache[pages].view(S, tile_len, Hkv, D).transpose(1, 2)  # (S, Hkv, L, D)
        scores = (q_g @ k_tile).float()  # (S, Hkv, G, L)
        k_pos = torch.arange(p0 * block_size, p0 * block_size + tile_len, device=q.device)
        beyond = k_pos[None, :] >= context_lens[:, None]  # (S, L): the partial last page, padding
        scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
        state.update(scores, v_tile)
    return state.result(q.dtype).view(S, Hq, D)


def _paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                   context_len: int, tile_tokens: int, block_q: int) -> Tensor:
    """q (Tq, Hq, D) for the last Tq positions of one sequence -> (Tq, Hq, D)."""
    Tq, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    offset = context_len - Tq
    q_g = (q * (1.0 / math.sqrt(D))).view(Tq, Hkv, group, D).transpose(0, 1).contiguous()  # (Hkv, Tq, G, D)
    out = torch.empty_like(q_g)
    step = _pages_per_tile(block_size, tile_tokens)
    for qs in range(0, Tq, block_q):
        qe = min(qs + block_q, Tq)
        rows = (qe - qs) * group
        q_tile = q_g[:, qs:qe].reshape(Hkv, rows, D)
        q_pos = torch.arange(offset + qs, offset + qe, device=q.device).repeat_interleave(group)
        state = OnlineSoftmax((Hkv, rows), D, q.device)
        k_end = offset + qe  # the last query of the tile sees keys < k_end; later pages are skipped
        n_pages = -(-k_end // block_size)
        for p0 in range(0, n_pages, step):
            pages = block_table[p0:min(p0 + step, n_pages)]
            tile_len = pages.shape[0] * block_size
            k_tile = k_cache[pages].view(tile_len, Hkv, D).permute(1, 2, 0)  # (Hkv, D, L)
            v_tile = v_cache[pages].view(tile_len, Hkv, D).transpose(0, 1)  # (Hkv, L, D)
            scores = (q_tile @ k_tile).float()  # (Hkv, rows, L)
            k_pos = torch.arange(p0 * block_size, p0 * block_size + tile_len, device=q.device)
            if p0 * block_size + tile_len - 1 > offset + qs:  # the tile crosses the diagonal
                scores.masked_fill_(~causal_mask(q_pos, k_pos), float("-inf"))
            state.update(scores, v_tile)
        out[:, qs:qe] = state.result(q.dtype).view(Hkv, qe - qs, group, D)
    return out.transpose(0, 1).reshape(Tq, Hq, D)


def paged_flash_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedMetadata, *,
                          tile_tokens: int = DEFAULT_TILE_TOKENS, block_q: int = DEFAULT_BLOCK_Q) -> Tensor:
    out = torch.empty_like(q)
    starts = meta.query_start_loc
    if meta.decode_seqs.numel():
        rows = starts[meta.decode_seqs]
        max_context = max(meta.context_lens_host[s] for s in meta.decode_seqs.tolist())
        out[rows] = _paged_decode(q[rows], k_cache, v_cache, meta.block_tables[meta.decode_seqs],
                                  meta.context_lens[meta.decode_seqs], max_context, tile_tokens)
    offsets = _host_offsets(meta)
    for s in meta.prefill_seqs:
        lo, hi = offsets[s], offsets[s + 1]
        out[lo:hi] = _paged_prefill(q[lo:hi], k_cache, v_cache, meta.block_tables[s],
                                    meta.context_lens_host[s], tile_tokens, block_q)
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
    return cache[block_table[:n_pages]].flatten(0, 1)[:context_len]


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
    pages = meta.block_tables[:, :n_pages]
    k = k_cache[pages].view(S, n_pages * block_size, Hkv, D).transpose(1, 2)  # (S, Hkv, L, D)
    v = v_cache[pages].view(S, n_pages * block_size, Hkv, D).transpose(1, 2)
    k_pos = torch.arange(n_pages * block_size, device=q.device)
    mask = (k_pos[None, :] < meta.context_lens[:, None])[:, None, None, :]  # (S, 1, 1, L)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=Hq != Hkv)
    return out[:, :, 0]


PAGED_ATTENTION_IMPLS: dict[str, Callable[..., Tensor]] = {
    "flash": paged_flash_attention,
    "sdpa": paged_sdpa_attention,
    "naive": paged_naive_attention,
}
