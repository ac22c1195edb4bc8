"""Weight forms: one linear layer's weight packed for one matmul kernel, x (M, K) -> (M, N).

    DenseForm  the weight as a dense matrix in the model's dtype (F.linear): any device
    Fp16Form   fbgemm's packed float16 weight, float32 activations (CPU)
    Int8Form   `_weight_int8pack_mm`: int8 rows with one scale each, bfloat16 activations (CPU)
    Q4Form     `_weight_int4pack_mm_for_cpu`: 4-bit groups of 32 (GGUF Q4_1 exactly), bfloat16 activations

kvserve's own batch-invariant kernels (q4q8, q8q8, f32) are in model/kernel_forms.py; `kernel_available`
covers them too (they need the library `make install` builds).

A form returns its kernel's own output dtype (bfloat16 for the int kernels, float32 for fp16);
callers add, multiply or cast as they go, so a cast happens where the next op needs one anyway.
The int kernels are fed bfloat16: measured here, they run 5-80x slower with float32 or float16
activations (BENCHMARKS.md). Q4_1 maps onto the int4 kernel with scale = d and zero = m + 8 * d
(the kernel computes (q - 8) * scale + zero); with bfloat16 activations d and the zero are rounded
to bfloat16 too. Every form keeps its checkpoint weight (`source`) and reproduces it exactly with
`dequantize()`, so fused and converted projections are rebuilt from codes, never from rounded
floats, and tests compare each kernel with its own dequantized matrix. Not here: which form runs
when (model/quantization.py) and the module that holds the forms (model/linear.py).
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from model.quantized import GROUP, Int8Weight, Q4Weight, WeightT, dequantize

INT_ACTIVATIONS = torch.bfloat16  # what the CPU int4 / int8 kernels are fed
_Q4_ROWS = 32  # the CPU int4 packing works on blocks of 32 output rows


class WeightForm(ABC):
    name = ""
    shape: tuple[int, int]
    source: WeightT

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """x (M, K) -> (M, N) in the kernel's output dtype."""

    def dequantize(self) -> Tensor:
        """The (N, K) float32 matrix this form multiplies by."""
        return dequantize(self.source)

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the packed weight occupies."""


class DenseForm(WeightForm):
    name = "dense"

    def __init__(self, weight: Tensor):
        self.weight = self.source = weight  # (N, K) in the model's dtype
        self.shape = (weight.shape[0], weight.shape[1])

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Fp16Form(WeightForm):
    name = "fp16"

    def __init__(self, weight: Tensor):
        self.shape = (weight.shape[0], weight.shape[1])
        self.source: Tensor = weight.float().half().float()  # exactly what the packed weight holds
        self._packed = torch.ops.quantized.linear_prepack_fp16(self.source, None)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self._packed)

    def dequantize(self) -> Tensor:
        return self.source

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 2


class Int8Form(WeightForm):
    name = "int8"

    def __init__(self, weight: Int8Weight):
        self.source: Int8Weight = weight
        self.shape = weight.shape
        self._scale = weight.scale.to(INT_ACTIVATIONS)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(INT_ACTIVATIONS), self.source.qs, self._scale)

    def dequantize(self) -> Tensor:
        """With the scale rounded to the activations' dtype, as the kernel uses it."""
        return self.source.qs.float() * self._scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.source.qs.nbytes + self._scale.nbytes


def q4_scales_zeros(weight: Q4Weight, dtype: torch.dtype, rows: int) -> Tensor:
    """The int4 kernel's (K / 32, rows, 2) table for Q4_1 groups: scale d, zero m + 8 d (the kernel
    computes (q - 8) * scale + zero), in `dtype`; rows beyond N (padding) are zero."""
    n = weight.shape[0]
    d, m = weight.d.float(), weight.m.float()
    table = torch.stack((d.t(), m.t() + 8 * d.t()), dim=-1)  # (K/32, N, 2)
    return F.pad(table, (0, 0, 0, rows - n)).to(dtype).contiguous()


def q4_pack(weight: Q4Weight) -> Tensor:
    """Codes packed for `_weight_int4pack_mm_for_cpu`, N padded to whole blocks of 32 rows."""
    n = weight.shape[0]
    codes = weight.codes().to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(codes, (0, 0, 0, -n % _Q4_ROWS), value=8), 1)


class Q4Form(WeightForm):
    name = "q4"

    def __init__(self, weight: Q4Weight):
        self.source: Q4Weight = weight
        self.shape = n, k = weight.shape
        if k % GROUP:
            raise ValueError(f"Q4 form: K={k} is not a multiple of {GROUP}")
        self.packed = q4_pack(weight)  # padding rows: code 8, scale and zero 0 -> weight 0, cut off the output
        self.scales_zeros = q4_scales_zeros(weight, INT_ACTIVATIONS, self.packed.shape[0])

    def __call__(self, x: Tensor) -> Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(INT_ACTIVATIONS), self.packed, GROUP, self.scales_zeros)
        return out if out.shape[1] == self.shape[0] else out[:, :self.shape[0]]

    def dequantize(self) -> Tensor:
        """With d and the zero rounded to the activations' dtype, as the kernel uses them."""
        n, k = self.shape
        sz = self.scales_zeros[:, :n].float()  # (K/32, N, 2)
        q = self.source.codes().view(n, k // GROUP, GROUP).float() - 8
        return (q * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes


@functools.cache
def kernel_available(name: str, device: str) -> bool:
    """Whether this torch build runs form `name` on `device` (probed once on a tiny matrix)."""
    if name == "dense":
        return True
    if device != "cpu":
        return False
    if name in ("q4q8", "q8q8", "f32"):
        from model import kernels
        if not kernels.available():
            return False
    try:
        w = torch.randn(32, 64)
        x = torch.randn(2, 64)
        if name == "fp16":
            Fp16Form(w)(x)
        elif name == "int8":
            from model.quantized import quantize_int8_rows
            Int8Form(quantize_int8_rows(w))(x)
        elif name == "q4":
            from model.quantized import quantize_q4
            Q4Form(quantize_q4(w))(x)
        elif name == "q4q8":  # model/kernel_forms.py's packing: (N / 8, K / 32, bytes per block-group)
            torch.ops.kvserve.q4_1_mm(x, torch.zeros(4, 2, 160, dtype=torch.uint8), 32)
        elif name == "q8q8":
            torch.ops.kvserve.q8_0_mm(x, torch.zeros(4, 2, 272, dtype=torch.uint8), 32)
        elif name == "f32":
            torch.ops.kvserve.dense_mm(x, torch.ops.kvserve.dense_pack(w), 32)
        else:
            raise ValueError(f"unknown weight form {name!r}")
    except (RuntimeError, AttributeError):  # how torch reports a kernel this build or CPU lacks
        return False
    return True
