"""The tile machinery of the flash attention: the query-row layout, the causal bias of a tile,
the online softmax that folds key tiles into running (max, sum, accumulator), and the tiled
forward itself. `model.attention` (inference) and `model.flash_backward` (training) build on it;
`model.paged_attention` reuses the online softmax over cache pages.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Tuned on the 2-core CPU of this project (benchmarks/attention.py): a tile of 128 query tokens
# (x group rows) against 512 keys keeps one tile of scores (3 x 384 x 512 float32 = 2.4 MB for
# SmolLM2) in cache and amortises the fixed cost of the ~10 torch calls each tile takes.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 512
# Scores are kept in base 2 (log2(e) folded into the query scale): exp2 is ~40% cheaper than exp
# on this CPU and softmax is the same in any base.
LOG2E = math.log2(math.e)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention computes in: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class CausalBias:
    """Additive causal masks (0 or -inf) for tiles that cross the diagonal, built once per shape.

    Tile rows are query tokens repeated `group` times (one row per query head of a K/V head);
    `get(rows, cols, shift)` masks key j of the tile for row r when j > r // group + shift, where
    shift = (absolute position of the tile's first query) - (position of its first key). A call
    meets only a handful of distinct (rows, cols, shift), so the cache stays small.
    """

    __slots__ = ("group", "dtype", "device", "_cache")

    def __init__(self, group: int, dtype: torch.dtype, device: torch.device):
        self.group, self.dtype, self.device = group, dtype, device
        self._cache: dict[tuple[int, int, int], Tensor] = {}

    def get(self, rows: int, cols: int, shift: int) -> Tensor:
        key = (rows, cols, shift)
        bias = self._cache.get(key)
        if bias is None:
            token = torch.arange(rows, device=self.device) // self.group
            hidden = torch.arange(cols, device=self.device)[None, :] > token[:, None] + shift
            bias = torch.zeros(rows, cols, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
            self._cache[key] = bias
        return bias


class OnlineSoftmax:
    """Running max `m`, running sum `l` and accumulator `acc` for rows of queries, over key tiles.

    Shapes: m and l (*rows, 1), acc (*rows, D); they are views into buffers the caller owns, so one
    allocation serves every query tile. `absorb(scores)` folds one tile of base-2 scores (*rows, L),
    masked entries -inf, into m and l, rescales acc, and returns the tile's probabilities (computed
    in place in `scores`) for the caller to multiply with the tile's values into acc.
    Invariant: acc / l is the softmax-weighted sum of every value seen so far. The first tile of each
    row must hold at least one unmasked key (true for causal attention, where key 0 is always
    visible), so `m` is finite after it; later fully masked rows contribute exp2(-inf) = 0.
    """

    __slots__ = ("m", "l", "acc")

    def __init__(self, m: Tensor, l: Tensor, acc: Tensor):
        self.m, self.l, self.acc = m, l, acc

    @classmethod
    def start(cls, m: Tensor, l: Tensor, acc: Tensor) -> OnlineSoftmax:
        """Reset the buffers to the empty state: m = -inf, l = 0, acc = 0."""
        return cls(m.fill_(float("-inf")), l.zero_(), acc.zero_())

    def absorb(self, scores: Tensor) -> Tensor:
        m_new = torch.maximum(scores.amax(dim=-1, keepdim=True), self.m)
        probs = scores.sub_(m_new).exp2_()
        alpha = self.m.sub_(m_new).exp2_()  # rescales what was summed under the old max
        self.l.mul_(alpha).add_(probs.sum(dim=-1, keepdim=True))
        self.acc.mul_(alpha)
        self.m.copy_(m_new)
        return probs

    def update(self, scores: Tensor, v: Tensor) -> None:
        """absorb, then acc += probs @ v, for 3-d (batch, rows, L) scores and (batch, L, D) values."""
        self.acc.baddbmm_(self.absorb(scores), v)

    def result_into(self, out: Tensor) -> None:
        """out = acc / l, cast to out's dtype. `out` may be a strided view of the caller's output with
        the rows split into more dims (e.g. (B, Hkv, T, G, D) for rows (B * Hkv, T * G))."""
        torch.div(self.acc.view(out.shape), self.l.view(*out.shape[:-1], 1), out=out)


def flash_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, block_q: int, block_k: int, lse: Tensor | None = None,
) -> Tensor:
    """The tiled forward. With `lse` (B * Hkv, Tq * G) given, also writes each query row's base-2
    log-sum-exp of its scaled scores there (rows ordered (t, g), as `q_rows` below): all the
    backward pass keeps of the softmax."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group, bh = Hq // Hkv, B * Hkv
    offset = Tk - Tq  # absolute position of query 0
    dtype = compute_dtype(q.dtype)
    # Query rows ordered (t, g), so a query tile of every head sharing a K/V head is one contiguous
    # (rows, D) slice and GQA is a plain batched matmul over (B, Hkv), never a repeat of K/V.
    q_rows = torch.empty(B, Hkv, Tq, group, D, dtype=dtype, device=q.device)
    torch.mul(q.view(B, Hkv, group, Tq, D).transpose(2, 3), LOG2E / math.sqrt(D), out=q_rows)
    q_rows = q_rows.view(bh, Tq * group, D)
    k_t = k.reshape(bh, Tk, D).to(dtype).contiguous().transpose(1, 2)  # (BH, D, Tk)
    v = v.reshape(bh, Tk, D).to(dtype).contiguous()  # (BH, Tk, D)
    # Written in (B, Tq, Hq, D) order: the layout the caller flattens next, so its reshape is free.
    out = torch.empty(B, Tq, Hkv, group, D, dtype=q.dtype, device=q.device)
    out_rows = out.permute(0, 2, 1, 3, 4)  # (B, Hkv, Tq, G, D) view
    # One buffer per quantity, viewed at each tile's size: no allocation inside the loops.
    max_rows, max_cols = min(block_q, Tq) * group, min(block_k, Tk)
    scores_buf = torch.empty(bh * max_rows * max_cols, dtype=dtype, device=q.device)
    m_buf = torch.empty(bh * max_rows, dtype=dtype, device=q.device)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(bh * max_rows * D, dtype=dtype, device=q.device)
    bias = CausalBias(group, dtype, q.device)
    for qs in range(0, Tq, block_q):
        qe = min(qs + block_q, Tq)
        rows = (qe - qs) * group
        q_tile = q_rows[:, qs * group:qe * group]  # (BH, rows, D)
        state = OnlineSoftmax.start(m_buf[:bh * rows].view(bh, rows, 1), l_buf[:bh * rows].view(bh, rows, 1),
                                    acc_buf[:bh * rows * D].view(bh, rows, D))
        k_end = min(Tk, offset + qe) if causal else Tk  # later keys are above the diagonal for the whole tile
        for ks in range(0, k_end, block_k):
            ke = min(ks + block_k, k_end)
            scores = scores_buf[:bh * rows * (ke - ks)].view(bh, rows, ke - ks)
            if causal and ke - 1 > offset + qs:  # the tile crosses the diagonal
                torch.baddbmm(bias.get(rows, ke - ks, offset + qs - ks), q_tile, k_t[:, :, ks:ke], out=scores)
            else:
                torch.bmm(q_tile, k_t[:, :, ks:ke], out=scores)
            state.update(scores, v[:, ks:ke])
        state.result_into(out_rows[:, :, qs:qe])
        if lse is not None:
            torch.add(state.m, state.l.log2(), out=lse[:, qs * group:qe * group, None])
    return out.view(B, Tq, Hq, D).transpose(1, 2)
