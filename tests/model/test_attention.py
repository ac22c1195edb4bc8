"""Contiguous attention: flash == naive == sdpa against an independent float64 computation.

The reference below is written from the definition (per query head, its K/V head by integer
division, explicit positions for the end-aligned causal mask, softmax by exp / sum in float64);
it shares no code with model.attention. Small tile sizes make flash cross several query and key
tiles, cut Tk mid-tile, and skip tiles above the diagonal.
"""
from __future__ import annotations

import math

import pytest
import torch

import model.flash_tiles as flash_tiles
from model.attention import (
    flash_attention,
    get_attention,
    naive_attention,
    resolve_attention,
    sdpa_attention,
)
from model.flash_tiles import OnlineSoftmax
from tests.reference import peak_allocated_bytes

HEADS = [(8, 8), (8, 2), (8, 1), (9, 3)]  # (Hq, Hkv): MHA, GQA, MQA, SmolLM2's GQA
TK = 37  # not a multiple of any tile size used here
TQS = [1, 15, TK, 24]  # decode, odd, == Tk (prefill), < Tk (prefill after a cached prefix)
FLASH_TILES = [
    {},  # the defaults: one tile each way at these sizes
    {"block_q": 4, "block_k": 8},  # several tiles, diagonal crossings and skipped tiles
    {"block_q": 5, "block_k": 3},  # key tiles smaller than query tiles
]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention from the definition, in float64, one head at a time."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, Tq, D, dtype=torch.float64)
    q_pos = torch.arange(Tk - Tq, Tk)  # query i sits at absolute position Tk - Tq + i
    k_pos = torch.arange(Tk)
    for h in range(Hq):
        kv = h // (Hq // Hkv)
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(D)  # (B, Tq, Tk)
        if causal:
            scores = torch.where(k_pos[None, :] <= q_pos[:, None], scores, torch.tensor(-math.inf, dtype=torch.float64))
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        out[:, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ v[:, kv]
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def random_qkv(B, Hq, Hkv, Tq, Tk, D, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=gen)
    k = torch.randn(B, Hkv, Tk, D, generator=gen)
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tq", TQS, ids=lambda t: f"Tq{t}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_all_implementations_match_float64_reference(heads, tq, causal):
    Hq, Hkv = heads
    q, k, v = random_qkv(2, Hq, Hkv, tq, TK, 16, seed=Hq * 100 + Hkv * 10 + tq)
    ref = reference(q, k, v, causal)
    outputs = {"naive": naive_attention(q, k, v, causal=causal), "sdpa": sdpa_attention(q, k, v, causal=causal)}
    for tiles in FLASH_TILES:
        outputs[f"flash {tiles}"] = flash_attention(q, k, v, causal=causal, **tiles)
    for name, out in outputs.items():
        assert out.shape == (2, Hq, tq, 16) and out.dtype == torch.float32, name
        assert rel_error(out, ref) < 1e-5, name


@pytest.mark.parametrize("tq", [700, 300, 1], ids=lambda t: f"Tq{t}")
def test_flash_default_tiles_over_several_tiles(tq):
    """Tk = 700 spans two default key tiles and Tq up to six default query tiles."""
    q, k, v = random_qkv(2, 9, 3, tq, 700, 64, seed=tq)
    ref = reference(q, k, v, causal=True)
    assert rel_error(flash_attention(q, k, v, causal=True), ref) < 1e-5
    assert rel_error(naive_attention(q, k, v, causal=True), ref) < 1e-5
    assert rel_error(sdpa_attention(q, k, v, causal=True), ref) < 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(8, 8), (9, 3), (8, 1)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_bfloat16_inputs(heads, causal):
    """bf16 in, bf16 out; error against float64 on the same (rounded) inputs is bf16 rounding."""
    Hq, Hkv = heads
    q, k, v = random_qkv(2, Hq, Hkv, 29, 45, 64, dtype=torch.bfloat16, seed=Hq)
    ref = reference(q, k, v, causal)
    for fn in (naive_attention, sdpa_attention, flash_attention):
        out = fn(q, k, v, causal=causal)
        assert out.dtype == torch.bfloat16 and out.shape == (2, Hq, 29, 64)
        assert rel_error(out, ref) < 1e-2, fn.__name__  # bf16 keeps 8 bits: ~4e-3 per rounding
    small_tiles = flash_attention(q, k, v, causal=causal, block_q=4, block_k=8)
    assert rel_error(small_tiles, ref) < 1e-2


@pytest.mark.parametrize("growing", [True, False], ids=["max-grows", "max-shrinks"])
def test_flash_rescales_when_the_running_max_changes(growing):
    """Scores that climb (or fall) steeply along the keys force every later tile to rescale the
    accumulator (or to underflow against the first tile's max); both must stay exact."""
    q, k, v = random_qkv(2, 8, 2, 40, 40, 16, seed=7)
    ramp = torch.linspace(0.0, 6.0, 40)
    k = k * (ramp if growing else ramp.flip(0))[None, None, :, None]
    ref = reference(q, k, v, causal=True)
    assert rel_error(flash_attention(q, k, v, causal=True, block_q=8, block_k=4), ref) < 1e-5
    assert rel_error(flash_attention(q, k, v, causal=False, block_q=8, block_k=4), reference(q, k, v, False)) < 1e-5


def test_non_contiguous_inputs_as_the_model_passes_them():
    """The transformer hands over (B, T, H, D) tensors transposed to (B, H, T, D)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 30, 9, 16, generator=gen).transpose(1, 2)
    k = torch.randn(2, 30, 3, 16, generator=gen).transpose(1, 2)
    v = torch.randn(2, 30, 3, 16, generator=gen).transpose(1, 2)
    ref = reference(q, k, v, causal=True)
    for fn in (naive_attention, sdpa_attention, flash_attention):
        assert rel_error(fn(q, k, v, causal=True), ref) < 1e-5, fn.__name__


def test_flash_computes_only_tiles_on_or_below_the_diagonal(monkeypatch):
    """Causal Tq = Tk = 64 in 16 x 16 tiles: 4 + 3 + 2 + 1 = 10 score tiles, not 16."""
    score_tiles = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm

    def counting_bmm(a, b, **kw):
        score_tiles.append(b.shape[-1])
        return real_bmm(a, b, **kw)

    def counting_baddbmm(bias, a, b, **kw):
        score_tiles.append(b.shape[-1])
        return real_baddbmm(bias, a, b, **kw)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    monkeypatch.setattr(torch, "baddbmm", counting_baddbmm)
    q, k, v = random_qkv(1, 4, 2, 64, 64, 16)
    out = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    assert len(score_tiles) == 10
    score_tiles.clear()
    flash_attention(q, k, v, causal=False, block_q=16, block_k=16)
    assert len(score_tiles) == 16
    monkeypatch.undo()
    assert rel_error(out, reference(q, k, v, causal=True)) < 1e-5


def test_flash_memory_stays_linear_in_sequence_length():
    """At T = 2048 one (Hq, T, T) float32 score matrix is 151 MB; flash holds one (Hkv, 128*G, 512)
    score tile plus O(T) buffers. The output it must allocate is the measurement's lower bound."""
    T = 2048
    q, k, v = random_qkv(1, 9, 3, T, T, 64)
    score_matrix = 9 * T * T * 4
    flash_peak = peak_allocated_bytes(lambda: flash_attention(q, k, v, causal=True))
    assert q.nbytes <= flash_peak < score_matrix / 6


def test_online_softmax_folds_tiles_like_one_softmax():
    """Folding scores tile by tile (one tile fully masked for some rows) == softmax of the whole."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 6, 20, generator=gen, dtype=torch.float64) * 4
    scores[:, :2, 14:] = -math.inf  # rows 0-1 see nothing in the last tile
    values = torch.randn(3, 20, 8, generator=gen, dtype=torch.float64)
    state = OnlineSoftmax.start(torch.empty(3, 6, 1, dtype=torch.float64), torch.empty(3, 6, 1, dtype=torch.float64),
                                torch.empty(3, 6, 8, dtype=torch.float64))
    for lo, hi in [(0, 7), (7, 14), (14, 20)]:
        # OnlineSoftmax works in base 2: feed log2(e) * natural-log scores.
        state.update(scores[..., lo:hi] * flash_tiles.LOG2E, values[:, lo:hi])
    out = torch.empty(3, 6, 8, dtype=torch.float64)
    state.result_into(out)
    torch.testing.assert_close(out, torch.softmax(scores, dim=-1) @ values, rtol=1e-12, atol=1e-12)


def test_get_attention_names_the_choices():
    assert get_attention("flash") is flash_attention
    with pytest.raises(ValueError, match=r"unknown attention 'fast'; choose one of: flash, sdpa, naive, kernel"):
        get_attention("fast")
    with pytest.raises(ValueError, match=r"unknown attention 'fast'"):
        resolve_attention("fast", "cpu")
    assert resolve_attention("sdpa", "cpu") == "sdpa"
    assert resolve_attention("auto", "meta") == "flash"  # off CPU the kernel never runs
    with pytest.raises(ValueError, match=r"attention 'kernel' runs on CPU"):
        resolve_attention("kernel", "meta")
