"""FlashAttention's backward pass in plain PyTorch: `flash_attention` made differentiable.

`FlashAttentionFunction` is the autograd Function `model.attention.flash_attention` runs when
gradients are on. Its forward is the tiled forward (`flash_forward`) and saves q, k, v, the output
and one log-sum-exp per query row, never a (Tq, Tk) matrix. Its backward walks the same tiles
in FlashAttention-2's order (Dao 2023, algorithm 2): for each key tile, for each query tile that
sees it,

    P  = exp2(S - L)            S: the tile's base-2 scores, L: the row's saved base-2 log-sum-exp
    dV += P^T dO                dP = dO V^T
    dS = P * (dP - Drow)        Drow = rowsum(dO * O), computed once per row
    dQ += dS K                  dK += dS^T Q

so memory stays linear in the sequence length. As in the forward, the query rows of every head
sharing a K/V head form one matrix (rows ordered (t, g)), so dK and dV come out summed over each
group's query heads by the matmuls themselves: K/V are never repeated. Causal is bottom-right
aligned (query i at position Tk - Tq + i); tiles above the diagonal are skipped, tiles crossing it
get the forward's additive mask. The backward is not itself differentiable (no double backward).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from model.flash_tiles import LOG2E, CausalBias, compute_dtype, flash_forward


def _rows(x: Tensor, n_kv_heads: int, dtype: torch.dtype) -> Tensor:
    """(B, Hq, T, D) -> (B * Hkv, T * G, D) in `dtype`, a query head's rows interleaved (t, g)."""
    B, Hq, T, D = x.shape
    group = Hq // n_kv_heads
    rows = torch.empty(B, n_kv_heads, T, group, D, dtype=dtype, device=x.device)
    rows.copy_(x.reshape(B, n_kv_heads, group, T, D).transpose(2, 3))
    return rows.view(B * n_kv_heads, T * group, D)


def _unrows(rows: Tensor, shape: torch.Size, n_kv_heads: int, dtype: torch.dtype) -> Tensor:
    """The inverse of `_rows`: (B * Hkv, T * G, D) -> (B, Hq, T, D) in `dtype`."""
    B, Hq, T, D = shape
    group = Hq // n_kv_heads
    return rows.view(B, n_kv_heads, T, group, D).transpose(2, 3).reshape(B, Hq, T, D).to(dtype)


def flash_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, *,
                             causal: bool, block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes and dtypes of q, k, v) from the forward's inputs, output and base-2
    log-sum-exp `lse` (B * Hkv, Tq * G), and the output's gradient `d_out` (B, Hq, Tq, D)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group, bh = Hq // Hkv, B * Hkv
    offset = Tk - Tq  # absolute position of query 0
    dtype = compute_dtype(q.dtype)
    q_rows = _rows(q, Hkv, dtype).mul_(LOG2E / math.sqrt(D))  # (BH, Tq*G, D), scaled as in the forward
    do_rows = _rows(d_out, Hkv, dtype)  # (BH, Tq*G, D)
    delta = (do_rows * _rows(out, Hkv, dtype)).sum(dim=-1, keepdim=True)  # (BH, Tq*G, 1): rowsum(dO * O)
    lse = lse.unsqueeze(-1)  # (BH, Tq*G, 1)
    k = k.reshape(bh, Tk, D).to(dtype).contiguous()  # (BH, Tk, D)
    v_t = v.reshape(bh, Tk, D).to(dtype).contiguous().transpose(1, 2)  # (BH, D, Tk)
    k_t = k.transpose(1, 2)
    dq = torch.zeros(bh, Tq * group, D, dtype=dtype, device=q.device)
    dk = torch.empty(bh, Tk, D, dtype=dtype, device=q.device)
    dv = torch.empty_like(dk)
    max_rows, max_cols = min(block_q, Tq) * group, min(block_k, Tk)
    p_buf = torch.empty(bh * max_rows * max_cols, dtype=dtype, device=q.device)
    dp_buf = torch.empty_like(p_buf)
    bias = CausalBias(group, dtype, q.device)
    for ks in range(0, Tk, block_k):
        ke = min(ks + block_k, Tk)
        cols = ke - ks
        dk_tile, dv_tile = dk[:, ks:ke].zero_(), dv[:, ks:ke].zero_()  # (BH, cols, D) accumulators
        # Query t sees key ks from position offset + t >= ks on: earlier query tiles see none of it.
        first = (max(0, ks - offset) // block_q) * block_q if causal else 0
        for qs in range(first, Tq, block_q):
            qe = min(qs + block_q, Tq)
            r0, r1 = qs * group, qe * group
            p = p_buf[:bh * (r1 - r0) * cols].view(bh, r1 - r0, cols)
            if causal and ke - 1 > offset + qs:  # the tile crosses the diagonal
                torch.baddbmm(bias.get(r1 - r0, cols, offset + qs - ks), q_rows[:, r0:r1], k_t[:, :, ks:ke], out=p)
            else:
                torch.bmm(q_rows[:, r0:r1], k_t[:, :, ks:ke], out=p)
            p.sub_(lse[:, r0:r1]).exp2_()  # the forward's probabilities, masked entries 0
            dv_tile.baddbmm_(p.transpose(1, 2), do_rows[:, r0:r1])
            ds = torch.bmm(do_rows[:, r0:r1], v_t[:, :, ks:ke], out=dp_buf[:p.numel()].view(p.shape))
            ds.sub_(delta[:, r0:r1]).mul_(p)  # dS = P * (dP - Drow): the gradient of the natural-log scores
            dq[:, r0:r1].baddbmm_(ds, k[:, ks:ke])
            dk_tile.baddbmm_(ds.transpose(1, 2), q_rows[:, r0:r1])
    dq.mul_(1.0 / math.sqrt(D))  # scores = q.k / sqrt(D)
    dk.mul_(1.0 / LOG2E)  # q_rows carried LOG2E / sqrt(D); dK needs 1 / sqrt(D)
    return (_unrows(dq, q.shape, Hkv, q.dtype), dk.view(B, Hkv, Tk, D).to(k.dtype),
            dv.view(B, Hkv, Tk, D).to(v.dtype))


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled attention with a tiled backward: saves q, k, v, the output and the row log-sum-exps."""

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, causal: bool, block_q: int,
                block_k: int) -> Tensor:
        B, Hq, Tq, _ = q.shape
        Hkv = k.shape[1]
        lse = torch.empty(B * Hkv, Tq * (Hq // Hkv), dtype=compute_dtype(q.dtype), device=q.device)
        out = flash_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k, lse=lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.block_q, ctx.block_k = causal, block_q, block_k  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, d_out, causal=ctx.causal,
                                              block_q=ctx.block_q, block_k=ctx.block_k)
        return dq, dk, dv, None, None, None
