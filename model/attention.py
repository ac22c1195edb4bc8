"""Contiguous attention: three interchangeable implementations of one signature.

    fn(q[B, Hq, Tq, D], k[B, Hkv, Tk, D], v[B, Hkv, Tk, D], *, causal: bool) -> [B, Hq, Tq, D]

Scale is 1/sqrt(D). With `causal`, the diagonal is aligned to the end: query i sits at absolute
position Tk - Tq + i and sees keys 0..Tk-Tq+i, so one call serves prefill, prefill after a cached
prefix, and decode. Hkv must divide Hq (MHA, GQA, MQA).

- `naive_attention` materialises the whole (Tq, Tk) score matrix: the readable reference.
- `flash_attention` is the FlashAttention forward in plain tensor ops: tiles over queries and keys,
  online softmax, O(Tq + Tk) extra memory per tile, grouped query heads instead of repeated K/V.
- `sdpa_attention` is torch's fused kernel, for comparison.
The paged (KV-cache) forms live in `model.paged_attention`.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


class AttentionFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor: ...


def causal_mask(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """True where a query may see a key: (len(q_positions), len(k_positions))."""
    return k_positions[None, :] <= q_positions[:, None]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(D)  # (B, Hq, Tq, Tk)
    if causal:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
        scores = scores.masked_fill(~causal_mask(q_pos, torch.arange(Tk, device=q.device)), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return probs @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    enable_gqa = q.shape[1] != k.shape[1]
    if not causal or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    # torch's is_causal aligns the diagonal to the top-left; ours is bottom-right.
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
    mask = causal_mask(q_pos, torch.arange(Tk, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class OnlineSoftmax:
    """Running max `m`, running sum `l` and accumulator `acc` for rows of queries.

    `update(scores, v)` folds one tile of float32 scores (rows, keys) and its values (keys, D);
    masked scores are -inf. Invariant: acc / l is the softmax-weighted sum of every value seen so
    far. The first tile of each row must hold at least one unmasked key (true for causal attention,
    where key 0 is always visible), so `m` is finite after it.
    """

    __slots__ = ("m", "l", "acc")

    def __init__(self, rows_shape: tuple[int, ...], head_dim: int, device: torch.device):
        self.m = torch.full((*rows_shape, 1), float("-inf"), dtype=torch.float32, device=device)
        self.l = torch.zeros((*rows_shape, 1), dtype=torch.float32, device=device)
        self.acc = torch.zeros((*rows_shape, head_dim), dtype=torch.float32, device=device)

    def update(self, scores: Tensor, v: Tensor) -> None:
        m_new = torch.maximum(self.m, scores.amax(dim=-1, keepdim=True))
        probs = scores.sub_(m_new).exp_()
        alpha = (self.m - m_new).exp_()
        self.l.mul_(alpha).add_(probs.sum(dim=-1, keepdim=True))
        self.acc.mul_(alpha).add_(probs.to(v.dtype) @ v)
        self.m = m_new

    def result(self, dtype: torch.dtype) -> Tensor:
        return (self.acc / self.l).to(dtype)


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
) -> Tensor:
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    offset = Tk - Tq  # absolute position of query 0
    # Rows ordered (t, g) so a query tile of every head in a group is one contiguous slice.
    qg = (q * (1.0 / math.sqrt(D))).view(B, Hkv, group, Tq, D).transpose(2, 3).contiguous()  # (B, Hkv, Tq, G, D)
    out = torch.empty_like(qg)
    k_t = k.transpose(-1, -2)  # (B, Hkv, D, Tk)
    k_pos_all = torch.arange(Tk, device=q.device)
    for qs in range(0, Tq, block_q):
        qe = min(qs + block_q, Tq)
        rows = (qe - qs) * group
        q_tile = qg[:, :, qs:qe].reshape(B, Hkv, rows, D)
        state = OnlineSoftmax((B, Hkv, rows), D, q.device)
        k_end = min(Tk, offset + qe) if causal else Tk  # tiles wholly above the diagonal are skipped
        q_pos = torch.arange(offset + qs, offset + qe, device=q.device).repeat_interleave(group)
        for ks in range(0, k_end, block_k):
            ke = min(ks + block_k, k_end)
            scores = (q_tile @ k_t[..., ks:ke]).float()  # (B, Hkv, rows, bk)
            if causal and ke - 1 > offset + qs:  # the tile crosses the diagonal
                scores.masked_fill_(~causal_mask(q_pos, k_pos_all[ks:ke]), float("-inf"))
            state.update(scores, v[:, :, ks:ke])
        out[:, :, qs:qe] = state.result(q.dtype).view(B, Hkv, qe - qs, group, D)
    return out.transpose(2, 3).reshape(B, Hq, Tq, D)


ATTENTION_IMPLS: dict[str, Callable[..., Tensor]] = {
    "flash": flash_attention,
    "sdpa": sdpa_attention,
    "naive": naive_attention,
}


def get_attention(name: str) -> Callable[..., Tensor]:
    try:
        return ATTENTION_IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(ATTENTION_IMPLS)}") from None
