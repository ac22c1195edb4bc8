"""Contiguous attention: three interchangeable implementations of one signature.

    fn(q[B, Hq, Tq, D], k[B, Hkv, Tk, D], v[B, Hkv, Tk, D], *, causal: bool) -> [B, Hq, Tq, D]

Scale is 1/sqrt(D). With `causal`, the diagonal is aligned to the end: query i sits at absolute
position Tk - Tq + i and sees keys 0..Tk-Tq+i, so one call serves prefill, prefill after a cached
prefix, and decode. Hkv must divide Hq (MHA, GQA, MQA).

- `naive_attention` materialises the whole (Tq, Tk) score matrix: the readable reference.
- `flash_attention` is the FlashAttention forward in plain tensor ops: tiles over queries and keys,
  online softmax, one tile of scores in memory, tiles above the causal diagonal skipped, grouped
  query heads instead of repeated K/V. It is differentiable: with gradients on, it runs as
  `model.flash_backward.FlashAttentionFunction`, whose backward recomputes the tiles from each
  row's saved log-sum-exp; with gradients off (inference) it is the plain forward, no extra work.
- `sdpa_attention` is torch's fused kernel, for comparison.
The paged (KV-cache) forms live in `model.paged_attention`; the tiles, the online softmax and the
tiled forward in `model.flash_tiles`. Half-precision inputs are computed in float32 and the output cast back: this CPU
(AVX2, no bf16 matmul units) runs batched bfloat16 matmuls 20x or more slower than float32 ones.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from model.flash_backward import FlashAttentionFunction
from model.flash_tiles import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, compute_dtype, flash_forward


def causal_mask(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """True where a query may see a key: (len(q_positions), len(k_positions))."""
    return k_positions[None, :] <= q_positions[:, None]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    group = Hq // k.shape[1]
    dtype = compute_dtype(q.dtype)
    k = k.to(dtype).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    v = v.to(dtype).repeat_interleave(group, dim=1)
    scores = (q.to(dtype) @ k.transpose(-1, -2)).mul_(1.0 / math.sqrt(D))  # (B, Hq, Tq, Tk)
    if causal:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
        scores.masked_fill_(~causal_mask(q_pos, torch.arange(Tk, device=q.device)), float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


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


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
) -> Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttentionFunction.apply(q, k, v, causal, block_q, block_k)
    return flash_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)


ATTENTION_IMPLS: dict[str, Callable[..., Tensor]] = {
    "flash": flash_attention,
    "sdpa": sdpa_attention,
    "naive": naive_attention,
    "kernel": flash_attention,  # the C++ kernel reads the paged cache only; without a cache its model runs flash
}


ATTENTION_CHOICES = ("auto", *ATTENTION_IMPLS)


def resolve_attention(name: str, device: torch.device | str) -> str:
    """`auto`: the C++ kernel on CPU where its library is built (batch-invariant), else flash."""
    get_attention("flash" if name == "auto" else name)  # an unknown name fails here
    if name not in ("auto", "kernel"):
        return name
    from model import kernels  # loads the library on first use
    cpu = torch.device(device).type == "cpu"
    if name == "kernel" and not (cpu and kernels.available()):
        raise ValueError(f"attention 'kernel' runs on CPU with kvserve's kernel library: "
                         f"{kernels.unavailable_reason() or 'not on ' + str(device)}")
    return "kernel" if cpu and kernels.available() else "flash"


def get_attention(name: str) -> Callable[..., Tensor]:
    try:
        return ATTENTION_IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; choose one of: {', '.join(ATTENTION_IMPLS)}") from None
