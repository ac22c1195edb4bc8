"""Quantized weights and weight forms: every kernel against its own dequantized matrix in float64.

Random weights (fast). The tolerance is the rounding of what a kernel is fed and returns: int4 /
int8 kernels take and give bfloat16 (8 significant bits), so they are compared with the float64
product of the bfloat16-rounded input and the form's dequantized matrix, to a few bf16 steps of
the output; fp16 and dense float32 keep float32 activations. A wrong nibble order, a zero of m
instead of m + 8 d, a lost scale or a padding row leaking in all miss by orders of magnitude.
The exact Q4_1 mapping on the real SmolLM2 blocks is in test_quantization_smollm2.py.
"""
from __future__ import annotations

import pytest
import torch

from model.linear import Linear
from model.quantized import GROUP, Q4Weight, Q8Weight, cat_rows, dequantize, quantize_int8_rows, quantize_q4, weight_rows
from model.weight_forms import INT_ACTIVATIONS, DenseForm, Fp16Form, Int8Form, Q4Form, kernel_available

pytestmark = pytest.mark.skipif(not all(kernel_available(k, "cpu") for k in ("q4", "int8", "fp16")),
                                reason="this torch build lacks a CPU weight-only kernel")


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) / k ** 0.5 + 0.02 * torch.randn(n, 1, generator=gen)


def forms(w: torch.Tensor) -> dict[str, object]:
    return {"dense-float32": DenseForm(w), "dense-bfloat16": DenseForm(w.bfloat16()), "fp16": Fp16Form(w),
            "int8": Int8Form(quantize_int8_rows(w)), "q4": Q4Form(quantize_q4(w))}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("shape", [(96, 64), (40, 128), (576, 576)], ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_every_form_matches_its_dequantized_matrix(shape, rows):
    w = random_weight(*shape, seed=shape[0] + rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
    for name, form in forms(w).items():
        out = form(x)
        assert out.shape == (rows, shape[0]), name
        fed = {"dense-bfloat16": torch.bfloat16, "int8": INT_ACTIVATIONS, "q4": INT_ACTIVATIONS}.get(name, torch.float32)
        ref = x.to(fed).double() @ form.dequantize().double().t()
        tol = 1e-5 if fed == torch.float32 else 1.6e-2  # two bf16 steps of the largest output
        assert rel_error(out, ref) < tol, name


def test_forms_approximate_the_dense_weight_by_their_precision():
    """Each form's own matrix is the weight within its format's step: fp16 2^-11, int8 a row's
    absmax / 254, Q4 a group's range / 30 (plus, for the int kernels, the bf16 rounding of their
    scales and zeros)."""
    w = random_weight(64, 128, seed=1)
    f = forms(w)
    assert (f["fp16"].dequantize() - w).abs().max() <= w.abs().max() * 2 ** -11
    assert ((f["int8"].dequantize() - w).abs().amax(1) <= w.abs().amax(1) * (1 / 254 + 2 ** -8)).all()
    groups = w.view(64, -1, GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (N, K/32)
    err = (f["q4"].dequantize() - w).abs().view(64, -1, GROUP).amax(-1)
    assert (err <= step / 2 + groups.abs().amax(-1) * 2 ** -7).all()


def test_q4_quantization_is_llama_cpp_rule_and_idempotent():
    w = random_weight(32, 64, seed=2)
    q = quantize_q4(w)
    codes = q.codes().view(32, 2, GROUP)
    assert codes.dtype == torch.uint8 and int(codes.min()) == 0 and int(codes.max()) == 15
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()  # every group spans 0..15
    again = quantize_q4(q.dequantize())
    assert torch.equal(again.qs, q.qs) and torch.equal(again.d, q.d) and torch.equal(again.m, q.m)


def test_q4_byte_layout_is_ggufs():
    """Per group of 32: byte j holds weight j in its low nibble and weight j + 16 in its high one."""
    codes = torch.arange(32, dtype=torch.uint8) % 16
    w = Q4Weight(qs=(codes[:16] | (codes[16:] << 4)).view(1, 16), d=torch.ones(1, 1, dtype=torch.float16),
                 m=torch.zeros(1, 1, dtype=torch.float16))
    assert torch.equal(w.codes()[0], codes)
    assert torch.equal(w.dequantize()[0], codes.float())


def test_q8_lookup_is_exact_rows():
    gen = torch.Generator().manual_seed(3)
    q8 = Q8Weight(qs=torch.randint(-127, 128, (10, 64), generator=gen, dtype=torch.int8),
                  d=(torch.rand(10, 2, generator=gen) * 0.1).half())
    ids = torch.tensor([[3, 0], [9, 3]])
    assert torch.equal(q8.lookup(ids, torch.float32), q8.dequantize()[ids])


def test_rows_and_cat_keep_codes():
    w = random_weight(96, 64, seed=4)
    for quantized in (quantize_q4(w), quantize_int8_rows(w), w):
        parts = [weight_rows(quantized, 0, 32), weight_rows(quantized, 32, 96)]
        assert torch.equal(dequantize(cat_rows(parts)), dequantize(quantized))
    mixed = cat_rows([quantize_q4(w[:32]), w[32:]])  # different kinds meet as dense float32
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed[32:], w[32:])


def test_q4_pads_rows_to_whole_blocks_and_cuts_the_output():
    w = random_weight(40, 64, seed=5)  # 40 rows: not a multiple of the kernel's 32-row blocks
    form = Q4Form(quantize_q4(w))
    assert form.packed.shape[0] == 64
    x = torch.randn(3, 64)
    out = form(x)
    assert out.shape == (3, 40)
    assert rel_error(out, x.bfloat16().double() @ form.dequantize().double().t()) < 1.6e-2


def test_int_kernels_are_batch_invariant():
    """A row's output does not depend on the other rows of the batch (the engine compares batched
    decoding with one request at a time)."""
    w = random_weight(64, 128, seed=6)
    x = torch.randn(33, 128)
    for form in (Int8Form(quantize_int8_rows(w)), Q4Form(quantize_q4(w))):
        full = form(x)
        for m in (1, 2, 5, 8, 17):
            assert torch.equal(form(x[:m]), full[:m]), (form.name, m)


def test_linear_picks_its_form_by_row_count():
    w = random_weight(64, 128, seed=7)
    small, large = Q4Form(quantize_q4(w)), Fp16Form(w)
    linear = Linear(small, large, crossover=4)
    assert linear.form_for(1) is small and linear.form_for(4) is small and linear.form_for(5) is large
    x = torch.randn(6, 128)
    assert torch.equal(linear(x[:4]), small(x[:4])) and torch.equal(linear(x), large(x))
    assert linear(x.view(2, 3, 128)).shape == (2, 3, 64)  # leading dims flatten into rows: 6 > 4
    assert torch.equal(linear(x.view(2, 3, 128)).view(6, 64), large(x))
    with pytest.raises(ValueError, match=r"forms of one linear differ in shape"):
        Linear(small, Fp16Form(w[:32]))
