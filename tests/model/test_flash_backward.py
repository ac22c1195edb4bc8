"""The flash attention backward: gradients equal autograd's through the naive attention.

float64 gradcheck on small shapes (finite differences, independent of any implementation), float32
gradients against the naive attention's autograd on larger ones, the saved statistics, memory, and
that inference (gradients off) never enters the autograd Function.
"""
from __future__ import annotations

import math

import pytest
import torch

import model.flash_backward as flash_backward
from model.attention import flash_attention, naive_attention
from model.flash_tiles import LOG2E, flash_forward
from tests.reference import peak_allocated_bytes

HEADS = [(2, 2), (4, 2), (3, 1)]  # MHA, GQA, MQA


def random_qkv(B, Hq, Hkv, Tq, Tk, D, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(B, h, t, D, generator=gen) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    return [t.to(dtype).requires_grad_() for t in tensors]


def grads(fn, q, k, v, d_out, **kw):
    """Output and (dq, dk, dv) of fn at q, k, v for the upstream gradient d_out."""
    out = fn(q, k, v, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), d_out))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tq", [5, 9], ids=["Tq<Tk", "Tq=Tk"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_gradcheck_float64(heads, tq, causal):
    """Finite differences agree with the analytic backward; tiles of 2 x 4 cross the diagonal,
    cut both lengths mid-tile and (causal) skip key tiles for early query tiles. Causal GQA with
    Tq < Tk checks every Jacobian entry, the rest random projections of it (gradcheck's fast mode)."""
    q, k, v = random_qkv(1, *heads, tq, 9, 4, dtype=torch.float64, seed=sum(heads) + tq)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=2, block_k=4),
                                    (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=not (heads == (4, 2) and causal and tq == 5))


CASES = {  # name -> (B, Hq, Hkv, Tq, Tk, D, tiles)
    "mha": (2, 4, 4, 150, 150, 32, dict(block_q=32, block_k=48)),
    "gqa": (2, 9, 3, 150, 150, 32, dict(block_q=32, block_k=48)),
    "mqa": (2, 8, 1, 150, 150, 32, dict(block_q=32, block_k=48)),
    "gqa-tq<tk": (1, 9, 3, 70, 181, 32, dict(block_q=16, block_k=40)),
    "mqa-decode": (2, 8, 1, 1, 181, 32, dict(block_q=16, block_k=40)),
    "gqa-default-tiles": (1, 9, 3, 300, 700, 64, {}),  # several 128 x 512 tiles, 700 = 512 + 188
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_gradients_match_naive_autograd(case, causal):
    B, Hq, Hkv, Tq, Tk, D, tiles = CASES[case]
    q, k, v = random_qkv(B, Hq, Hkv, Tq, Tk, D, seed=len(case))
    d_out = torch.randn(B, Hq, Tq, D, generator=torch.Generator().manual_seed(1))
    ours = grads(flash_attention, q, k, v, d_out, causal=causal, **tiles)
    ref = grads(naive_attention, q, k, v, d_out, causal=causal)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5, name


def test_gradients_through_transposed_inputs_as_the_model_passes_them():
    """The transformer hands (B, T, H, D) projections transposed to (B, H, T, D); the gradients
    must land in that layout."""
    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(2, 40, h, 16, generator=gen).requires_grad_() for h in (9, 3, 3)]
    d_out = torch.randn(2, 9, 40, 16, generator=gen)
    views = [t.transpose(1, 2) for t in base]
    ours = torch.autograd.grad(flash_attention(*views, causal=True, block_q=8, block_k=16), base, d_out)
    ref = torch.autograd.grad(naive_attention(*views, causal=True), base, d_out)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_are_bfloat16_and_close():
    q, k, v = random_qkv(1, 9, 3, 33, 50, 64, dtype=torch.bfloat16, seed=2)
    d_out = torch.randn(1, 9, 33, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    ours = grads(flash_attention, q, k, v, d_out, causal=True, block_q=8, block_k=16)
    ref = [t.double() for t in grads(naive_attention, *(t.detach().double().requires_grad_() for t in (q, k, v)),
                                     d_out.double(), causal=True)]
    for got, want in zip(ours, ref):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-2  # bf16 rounding


def test_saved_log_sum_exp_is_base_2_of_the_scaled_scores():
    """The one statistic the backward keeps: log2(sum_j exp(q.k_j / sqrt(D))) per query row,
    rows ordered (t, g) within each K/V head; checked against torch.logsumexp."""
    B, Hq, Hkv, Tq, Tk, D = 2, 6, 2, 11, 19, 8
    q, k, v = (t.detach() for t in random_qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float64))
    lse = torch.empty(B * Hkv, Tq * (Hq // Hkv), dtype=torch.float64)
    flash_forward(q, k, v, causal=True, block_q=4, block_k=8, lse=lse)
    scores = q @ k.repeat_interleave(Hq // Hkv, dim=1).transpose(-1, -2) / math.sqrt(D)  # (B, Hq, Tq, Tk)
    visible = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    natural = scores.masked_fill(~visible, -math.inf).logsumexp(dim=-1)  # (B, Hq, Tq)
    expected = natural.view(B, Hkv, Hq // Hkv, Tq).transpose(2, 3).reshape(B * Hkv, -1) * LOG2E
    torch.testing.assert_close(lse, expected, rtol=1e-12, atol=1e-12)


def test_inference_never_enters_the_autograd_function(monkeypatch):
    def refuse(*args):
        raise AssertionError("the autograd Function ran without gradients")

    monkeypatch.setattr(flash_backward.FlashAttentionFunction, "apply", refuse)
    q, k, v = random_qkv(1, 4, 2, 16, 16, 8)
    with torch.no_grad():
        assert flash_attention(q, k, v, causal=True).grad_fn is None
    with torch.inference_mode():
        flash_attention(q, k, v, causal=True)
    flash_attention(q.detach(), k.detach(), v.detach(), causal=True)


def test_forward_and_backward_memory_stay_linear():
    """At T = 2048 one (Hq, T, T) float32 score matrix is 151 MB and naive autograd keeps several;
    flash forward + backward holds O(T) tensors and two score tiles."""
    T = 2048
    q, k, v = random_qkv(1, 9, 3, T, T, 64)
    d_out = torch.randn(1, 9, T, 64)
    score_matrix = 9 * T * T * 4
    peak = peak_allocated_bytes(lambda: torch.autograd.grad(flash_attention(q, k, v, causal=True), (q, k, v), d_out))
    assert 3 * q.nbytes <= peak < score_matrix / 4  # at least dq, dk, dv and the saved output
