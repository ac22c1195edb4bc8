"""kvserve's q4q8 / q8q8 kernels against float64 references of their own arithmetic and of x @ W^T.

Tight: the float64 product of the quantized-then-dequantized activations (the kernel's rule, done
in Python) with the exact weight matrix, within float32 accumulation over K / 32 groups. Loose: the
unquantized x, within the activation rounding (half a step, absmax / 254 per group). The portable
scalar path must equal the SIMD path bit for bit. A wrong nibble, lane, scale or sign misses by
orders of magnitude. The library check, policy dispatch and packing sizes are here too.
"""
from __future__ import annotations

import json

import pytest
import torch

from model import kernels
from model.kernel_forms import Q4Q8Form, Q8Q8Form, q4q8_reference, q8q8_reference, quantize_activations
from model.linear import Linear
from model.quantization import WeightPolicy
from model.quantized import GROUP, Q4Weight, Q8Weight, quantize_q4, quantize_q8
from model.weight_forms import kernel_available
from tests.model.kernel_support import activations, random_q4, random_q8, require_kernels

EPS32 = 2.0 ** -24
SHAPES = [(8, 32), (45, 64), (203, 96), (576, 576), (100, 1536)]


@pytest.fixture(autouse=True)
def _kernels():
    require_kernels()


def dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    q, d = quantize_activations(x)
    return (q * d[..., None]).view(x.shape)


def tight_bound(xd: torch.Tensor, wabs: torch.Tensor) -> torch.Tensor:
    """float32 accumulation over K / 32 groups: per group two products and two fused adds round,
    each by at most one eps of the sum of |terms| (wabs: |d q| + |m| per weight, so a group whose
    min cancels its codes still counts its full terms)."""
    return (xd.abs() @ wabs.t()) * (4 * xd.shape[1] // GROUP + 2) * EPS32


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), float((err / (bound + 1e-30)).max())


def activation_bound(x: torch.Tensor, wabs: torch.Tensor) -> torch.Tensor:
    """Half an activation step per weight: sum over groups of absmax_g / 254 * sum |w| (times 1 + 1e-6
    for d_x's own float32 rounding)."""
    m, k = x.shape
    step = x.double().view(m, k // GROUP, GROUP).abs().amax(-1) / 254  # (M, G)
    return step @ wabs.view(wabs.shape[0], k // GROUP, GROUP).sum(-1).t() * (1 + 1e-6)


def check(out: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, wd: torch.Tensor, wabs: torch.Tensor) -> None:
    tight = tight_bound(dequantized_activations(x), wabs)
    assert_close(out, ref, tight)  # the kernel's own arithmetic
    assert_close(out, x.double() @ wd.t(), tight + activation_bound(x, wd.abs()))  # the unquantized product


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_q4q8_matches_its_arithmetic_and_the_dense_product(shape, rows):
    w = random_q4(*shape, seed=shape[0] + rows)
    x = activations(rows, shape[1], seed=rows)
    out = Q4Q8Form(w)(x)
    dq = w.codes().double().view(shape[0], -1, GROUP) * w.d.double()[..., None]
    m = w.m.double()[..., None]
    check(out, x, q4q8_reference(x, w), (dq + m).view(shape), (dq.abs() + m.abs()).view(shape))


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_q8q8_matches_its_arithmetic_and_the_dense_product(shape, rows):
    w = random_q8(*shape, seed=shape[0] + rows)
    x = activations(rows, shape[1], seed=rows)
    out = Q8Q8Form(w)(x)
    wd = w.dequantize().double()
    check(out, x, q8q8_reference(x, w), wd, wd.abs())


@pytest.mark.parametrize("rows", [1, 4, 5, 37])
def test_portable_path_equals_simd_path_bit_for_bit(rows):
    """Integer dot products are exact and every path rounds the same float ops in the same order."""
    for n, k in SHAPES:
        x = activations(rows, k, seed=n)
        q4, q8 = Q4Q8Form(random_q4(n, k, seed=n)), Q8Q8Form(random_q8(n, k, seed=n))
        assert torch.equal(q4(x), torch.ops.kvserve.q4_1_mm(x, q4.packed, n, True))
        assert torch.equal(q8(x), torch.ops.kvserve.q8_0_mm(x, q8.packed, n, True))
    assert torch.ops.kvserve.simd_path() == kernels.build_info()["simd_path"]


def test_extreme_codes_and_scales():
    """All-15 nibbles against +-127 activations (the int16 sums' worst case), -128 weights against
    -127 activations (the sign trick's), and an all-zero activation row; values exact in float32."""
    k = 256
    x = torch.full((3, k), 127.0)  # d_x = 1, q_x = 127
    x[1] = -127.0
    x[2] = 0.0
    ones = torch.ones(9, k // GROUP, dtype=torch.float16)
    q4 = Q4Weight(torch.full((9, k // 2), 0xFF, dtype=torch.uint8), ones, ones * 0.5)  # w = 15.5
    assert torch.equal(Q4Q8Form(q4)(x), torch.tensor([[15.5 * 127 * k] * 9, [-15.5 * 127 * k] * 9, [0.0] * 9]))
    q8 = Q8Weight(torch.full((9, k), -128, dtype=torch.int8), ones)
    assert torch.equal(Q8Q8Form(q8)(x), torch.tensor([[-128.0 * 127 * k] * 9, [128.0 * 127 * k] * 9, [0.0] * 9]))


def test_a_non_finite_activation_gives_a_nan_row_on_every_path_and_no_other():
    x = activations(4, 96, seed=3)
    x[1, 40] = float("nan")
    x[2, 7] = float("-inf")
    for form, op in ((Q4Q8Form(random_q4(21, 96, seed=3)), torch.ops.kvserve.q4_1_mm),
                     (Q8Q8Form(random_q8(21, 96, seed=3)), torch.ops.kvserve.q8_0_mm)):
        out = form(x)
        assert out[1:3].isnan().all() and not out[[0, 3]].isnan().any()
        assert torch.equal(out[[0, 3]], form(x[[0, 3]]))
        assert torch.allclose(out, op(x, form.packed, 21, True), rtol=0, atol=0, equal_nan=True)


def test_forms_keep_the_exact_weight_and_their_packed_size():
    w4, w8 = random_q4(45, 64, seed=1), random_q8(45, 64, seed=1)
    f4, f8 = Q4Q8Form(w4), Q8Q8Form(w8)
    assert torch.equal(f4.dequantize(), w4.dequantize()) and torch.equal(f8.dequantize(), w8.dequantize())
    blocks, groups = 6, 2  # 45 rows -> 6 blocks of 8
    assert f4.packed.shape == (blocks, groups, 160) and f4.nbytes == blocks * groups * 160
    assert f8.packed.shape == (blocks, groups, 272) and f8.nbytes == blocks * groups * 272
    out = Linear(f4)(activations(6, 64, seed=2).view(2, 3, 64))  # Linear reshapes (B, T, K)
    assert out.shape == (2, 3, 45) and out.dtype == torch.float32


def test_bad_shapes_are_refused_with_the_numbers():
    f = Q4Q8Form(random_q4(16, 64, seed=0))
    with pytest.raises(RuntimeError, match="K=96"):
        f(torch.randn(2, 96))
    with pytest.raises(ValueError, match="K=48"):
        Q8Q8Form(Q8Weight(torch.zeros(8, 48, dtype=torch.int8), torch.ones(8, 1, dtype=torch.float16)))


def test_policy_dispatches_the_kernel_kinds():
    assert kernel_available("q4q8", "cpu") and kernel_available("q8q8", "cpu")
    assert not kernel_available("q4q8", "cuda")
    policy = WeightPolicy("auto", "q4q8", "q4q8", "q8q8", "q8q8", "cpu")
    dense = torch.randn(24, 64)
    assert isinstance(policy.form("q4q8", random_q4(24, 64, seed=0), torch.float32), Q4Q8Form)
    assert isinstance(policy.form("q4q8", random_q8(24, 64, seed=0), torch.float32), Q8Q8Form)  # 8-bit stays 8-bit
    q8 = policy.form("q8q8", dense, torch.float32)
    assert isinstance(q8, Q8Q8Form) and torch.equal(q8.source.qs, quantize_q8(dense).qs)
    q4 = policy.form("q4q8", dense, torch.float32)
    assert isinstance(q4, Q4Q8Form) and torch.equal(q4.source.qs, quantize_q4(dense).qs)
    assert policy.form("q8q8", torch.randn(8, 40), torch.float32).name == "f32"  # K not whole groups: still invariant
    kinds = {type(policy.form("kernel", w, torch.float32)).__name__
             for w in (random_q4(24, 64, seed=1), random_q8(24, 64, seed=1), dense)}
    assert kinds == {"Q4Q8Form", "Q8Q8Form", "F32Form"}  # auto's one kind: each checkpoint tensor on its kernel


def test_quantize_q8_is_llama_cpps_rule():
    w = torch.randn(4, 64)
    q = quantize_q8(w)
    d = w.view(4, 2, GROUP).abs().amax(-1) / 127
    assert torch.equal(q.d, d.half())
    assert torch.equal(q.qs.view(4, 2, GROUP), torch.round(w.view(4, 2, GROUP) / d[..., None]).to(torch.int8))
    assert (q.qs.abs().view(4, 2, GROUP).amax(-1) == 127).all()


def test_build_problems_are_named(tmp_path):
    """The loader refuses a missing library, one built for another torch, or for CPU features this CPU lacks."""
    assert "not built" in kernels.build_problem(tmp_path, "2.13.0", set())
    (tmp_path / "kvserve_kernels.so").write_bytes(b"")
    info = {"torch": "2.13.0", "march": "skylake-avx512", "cpu_features": ["avx2", "avx512f"]}
    (tmp_path / "build.json").write_text(json.dumps(info))
    assert "torch 2.13.0, this is 9.9" in kernels.build_problem(tmp_path, "9.9", {"avx2", "avx512f"})
    assert "avx512f" in kernels.build_problem(tmp_path, "2.13.0", {"avx2", "fma"})
    assert kernels.build_problem(tmp_path, "2.13.0", {"avx2", "avx512f", "fma"}) is None
    assert kernels.build_problem(tmp_path, "2.13.0", None) is None  # no /proc/cpuinfo: nothing to check
