"""Attention over the paged KV cache, for a flat ragged batch of new tokens.

    fn(q[N, Hq, D], k_cache[num_blocks, Hkv, block_size, D], v_cache[...], plan) -> [N, Hq, D]

The new tokens' K/V are already written into the cache (see `write_kv`). Sequence s's queries are
its last query_lens[s] positions; they attend causally over its first context_lens[s] tokens.
`plan` (model/paged_plan.py) holds every index and mask of the step, built once for all layers.

- `paged_flash_attention`, the default: all decodes of the step together, a key tile at a time:
  one gather of every (sequence, K/V head) page slab of the tile into a (S * Hkv, L, D) buffer,
  one batched matmul for the scores of all query heads (grouped over their K/V head), the mask
  added in the same call, softmax, one batched matmul with V. A single tile (the common case)
  needs no online softmax, and on CPU skips the V gather: its value product is one
  `embedding_bag` (each query head's softmax row weighting its keys' V rows, read in place from
  the cache). Longer contexts fold tiles with the online softmax. Prefill chunks go one sequence at
  a time, tiled over queries and keys, diagonal tiles masked, tiles above it skipped.
- `paged_kernel_attention`: kvserve's C++ kernel (model/kernels/paged_attention.cpp), one query row
  at a time over key chunks fixed by absolute position, so a row's result is the same bits whatever
  else the step holds, however its prompt was chunked and whether its prefix came from the cache:
  the batch-invariant default on CPU where the kernel library is built.
- `paged_sdpa_attention` gathers the decodes' contexts the same way and calls torch's SDPA;
  prefills gather each whole context. `paged_naive_attention` gathers each sequence's context
  and runs the naive contiguous attention: the reference.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from model import kernels
from model.attention import naive_attention, sdpa_attention
from model.flash_tiles import DEFAULT_BLOCK_Q, LOG2E, OnlineSoftmax
from model.paged_plan import PagedPlan


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, plan: PagedPlan) -> None:
    """Store the new tokens' K/V (N, Hkv, D) at their slots."""
    D = k.shape[-1]
    k_cache.view(-1, D).index_copy_(0, plan.write_rows, k.reshape(-1, D).to(k_cache.dtype))
    v_cache.view(-1, D).index_copy_(0, plan.write_rows, v.reshape(-1, D).to(v_cache.dtype))


def _paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan) -> Tensor:
    """q (Sd, Hq, D), the decodes in tile order -> (Sd, Hq, D) in the compute dtype."""
    S, Hq, D = q.shape
    Hkv = plan.n_kv_heads
    group = Hq // Hkv
    gather = plan.buffers.gather
    tiles = plan.decode_tiles
    if len(tiles) == 1:
        tile = tiles[0]
        q_h = (q.to(plan.dtype) * (1.0 / math.sqrt(D))).view(S * Hkv, group, D)  # heads of a K/V head together
        k = gather("k", k_cache, tile.index, plan.dtype).view(S * Hkv, tile.length, D)
        if tile.bias is None:
            scores = torch.bmm(q_h, k.transpose(1, 2))  # (S * Hkv, G, L)
        else:
            scores = torch.baddbmm(tile.bias, q_h, k.transpose(1, 2))
        p = torch.softmax(scores, dim=-1)
        if tile.rows is not None and v_cache.dtype == plan.dtype:  # V read in place: no gather
            return F.embedding_bag(tile.rows, v_cache.view(-1, D), per_sample_weights=p.view(S * Hq, -1),
                                   mode="sum").view(S, Hq, D)
        v = gather("v", v_cache, tile.index, plan.dtype).view(S * Hkv, tile.length, D)
        return torch.bmm(p, v).view(S, Hq, D)
    q_h = (q.to(plan.dtype) * (LOG2E / math.sqrt(D))).view(S * Hkv, group, D)  # base-2 scores
    m = torch.empty(S * Hkv, group, 1, dtype=plan.dtype, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(S * Hkv, group, D, dtype=plan.dtype, device=q.device)
    OnlineSoftmax.start(m, l, acc)
    for tile in tiles:
        rows = tile.n * Hkv
        k = gather("k", k_cache, tile.index, plan.dtype).view(rows, tile.length, D)
        v = gather("v", v_cache, tile.index, plan.dtype).view(rows, tile.length, D)
        if tile.bias is None:
            scores = torch.bmm(q_h[:rows], k.transpose(1, 2))
        else:
            scores = torch.baddbmm(tile.bias, q_h[:rows], k.transpose(1, 2))  # 0 / -inf: any base
        OnlineSoftmax(m[:rows], l[:rows], acc[:rows]).update(scores, v)
    return acc.div_(l).view(S, Hq, D)


def _paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan, seq_index: int,
                   out: Tensor, block_q: int) -> None:
    """q (Tq, Hq, D) for the last Tq positions of one sequence; writes attention into out (Tq, Hq, D)."""
    seq = plan.prefills[seq_index]
    Tq, Hq, D = q.shape
    Hkv = plan.n_kv_heads
    group = Hq // Hkv
    offset = seq.context_len - Tq  # absolute position of query 0
    dtype = plan.dtype
    gather = plan.buffers.gather
    q_rows = torch.empty(Hkv, Tq, group, D, dtype=dtype, device=q.device)  # rows (t, g) per K/V head
    torch.mul(q.view(Tq, Hkv, group, D).transpose(0, 1), LOG2E / math.sqrt(D), out=q_rows)
    q_rows = q_rows.view(Hkv, Tq * group, D)
    out_rows = out.view(Tq, Hkv, group, D).transpose(0, 1)  # (Hkv, Tq, G, D) view
    max_rows = min(block_q, Tq) * group
    m_buf = torch.empty(Hkv * max_rows, dtype=dtype, device=q.device)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(Hkv * max_rows * D, dtype=dtype, device=q.device)
    for qs in range(0, Tq, block_q):
        qe = min(qs + block_q, Tq)
        rows = (qe - qs) * group
        q_tile = q_rows[:, qs * group:qe * group]  # (Hkv, rows, D)
        state = OnlineSoftmax.start(m_buf[:Hkv * rows].view(Hkv, rows, 1), l_buf[:Hkv * rows].view(Hkv, rows, 1),
                                    acc_buf[:Hkv * rows * D].view(Hkv, rows, D))
        k_end = offset + qe  # the tile's last query sees keys < k_end; later tiles are skipped
        for t0, index in seq.tiles:
            if t0 >= k_end:
                break
            k = gather("k", k_cache, index, dtype).view(Hkv, -1, D)  # (Hkv, L, D)
            v = gather("v", v_cache, index, dtype).view(Hkv, -1, D)
            L = k.shape[1]
            k_t = k.transpose(1, 2)  # (Hkv, D, L)
            if t0 + L - 1 > offset + qs:  # the tile crosses the diagonal (or holds the partial last page)
                scores = torch.baddbmm(plan.causal.get(rows, L, offset + qs - t0), q_tile, k_t)
            else:
                scores = torch.bmm(q_tile, k_t)
            state.update(scores, v)
        state.result_into(out_rows[:, qs:qe])


def paged_flash_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan, *,
                          block_q: int = DEFAULT_BLOCK_Q) -> Tensor:
    if plan.num_decodes and plan.decode_rows is None:  # a pure decode step: no row shuffling
        return _paged_decode(q, k_cache, v_cache, plan).to(q.dtype)
    out = torch.empty_like(q)
    if plan.num_decodes:
        assert plan.decode_rows is not None
        out.index_copy_(0, plan.decode_rows,
                        _paged_decode(q.index_select(0, plan.decode_rows), k_cache, v_cache, plan).to(q.dtype))
    for i, seq in enumerate(plan.prefills):
        _paged_prefill(q[seq.lo:seq.hi], k_cache, v_cache, plan, i, out[seq.lo:seq.hi], block_q)
    return out


def gather_context(cache: Tensor, block_table: Tensor, context_len: int) -> Tensor:
    """One sequence's first context_len tokens of a cache as a contiguous (Hkv, context_len, D)."""
    block_size = cache.shape[2]
    n_pages = -(-context_len // block_size)
    pages = cache.index_select(0, block_table[:n_pages])  # (P, Hkv, bs, D)
    return pages.transpose(0, 1).flatten(1, 2)[:, :context_len]


def _paged_by_gathering(attn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan) -> Tensor:
        out = torch.empty_like(q)
        meta, lo = plan.meta, 0
        for s, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
            hi = lo + q_len
            k = gather_context(k_cache, meta.block_tables[s], ctx)[None]  # (1, Hkv, Tk, D)
            v = gather_context(v_cache, meta.block_tables[s], ctx)[None]
            out[lo:hi] = attn(q[lo:hi].transpose(0, 1)[None], k, v, causal=True)[0].transpose(0, 1)
            lo = hi
        return out
    return paged


paged_naive_attention = _paged_by_gathering(naive_attention)
_paged_sdpa_per_sequence = _paged_by_gathering(sdpa_attention)


def paged_sdpa_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan) -> Tensor:
    """Gather-then-SDPA. A pure decode step gathers all contexts into one padded, masked batch."""
    if plan.prefills or plan.decode_rows is not None or len(plan.decode_tiles) != 1:
        return _paged_sdpa_per_sequence(q, k_cache, v_cache, plan)
    S, Hq, D = q.shape
    tile = plan.decode_tiles[0]
    gather = plan.buffers.gather
    k = gather("k", k_cache, tile.index, q.dtype).view(S, plan.n_kv_heads, tile.length, D)
    v = gather("v", v_cache, tile.index, q.dtype).view(S, plan.n_kv_heads, tile.length, D)
    mask = None if tile.bias is None else tile.bias.view(S, plan.n_kv_heads, 1, tile.length)[:, :1] == 0
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=Hq != plan.n_kv_heads)
    return out[:, :, 0]


def paged_kernel_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan) -> Tensor:
    if not kernels.available():  # loads the library on first use (cached after)
        raise RuntimeError(f"attention 'kernel': {kernels.unavailable_reason()}")
    out = torch.ops.kvserve.paged_attention(q.to(k_cache.dtype), k_cache, v_cache, plan.meta.block_tables,
                                            plan.seq_of_token, plan.meta.positions, 1.0 / math.sqrt(q.shape[-1]))
    return out.to(q.dtype)


PAGED_ATTENTION_IMPLS: dict[str, Callable[..., Tensor]] = {
    "kernel": paged_kernel_attention,
    "flash": paged_flash_attention,
    "sdpa": paged_sdpa_attention,
    "naive": paged_naive_attention,
}
