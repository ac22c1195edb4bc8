"""Weight forms on kvserve's own CPU kernels (model/kernels): float32 activations in, float32 out.

    Q4Q8Form  GGUF Q4_1 weights (`kvserve::q4_1_mm`)
    Q8Q8Form  GGUF Q8_0 weights (`kvserve::q8_0_mm`)
    F32Form   dense weights as float32, one fused multiply-add chain per output (`kvserve::dense_mm`)

Both quantize each activation row per group of 32 to int8 inside the kernel and sum exact integer
products, as llama.cpp does (q8_dot.cpp says how). A row's output does not depend on the other rows,
the row count or the thread count, bit for bit, so one form serves every batch size. The packing
below (N padded to blocks of 8 rows, per block and group the fp16 scales then the codes, 4 k per
int32 lane) is what the kernel reads; `dequantize()` is the checkpoint's exact weight matrix.
`q4q8_reference` / `q8q8_reference` compute the kernel's arithmetic in float64, for tests.
"""
from __future__ import annotations

import torch
from torch import Tensor

from model import kernels
from model.quantized import GROUP, Q4Weight, Q8Weight
from model.weight_forms import WeightForm

BLOCK_ROWS = 8  # output rows per packed block: one int32 lane each in a 256-bit vector


def _blocks(t: Tensor, n: int) -> Tensor:
    """(N, ...) -> (N / 8, 8, ...), zero rows appended up to a whole block."""
    pad = -n % BLOCK_ROWS
    if pad:
        t = torch.cat((t, t.new_zeros((pad, *t.shape[1:]))))
    return t.view(-1, BLOCK_ROWS, *t.shape[1:])


def _scales(s: Tensor, n: int) -> Tensor:
    """(N, G) fp16 -> (N / 8, G, 16) bytes: per group the 8 rows' scales."""
    return _blocks(s.to(torch.float16), n).transpose(1, 2).contiguous().view(torch.uint8)


def pack_q4(w: Q4Weight) -> Tensor:
    """(N / 8, K / 32, 160) uint8: d[8] m[8] fp16, then 4 vectors: lane c byte b of vector j holds
    q(c, 4j + b) in its low nibble and q(c, 16 + 4j + b) in its high one."""
    n, k = w.shape
    codes = _blocks(w.codes(), n).view(-1, BLOCK_ROWS, k // GROUP, 2, 4, 4)  # (B, c, g, half, j, b)
    lanes = codes.permute(0, 2, 3, 4, 1, 5)  # (B, g, half, j, c, b)
    qs = (lanes[:, :, 0] | (lanes[:, :, 1] << 4)).reshape(-1, k // GROUP, 128)
    return torch.cat((_scales(w.d, n), _scales(w.m, n), qs), dim=-1).contiguous()


def pack_q8(w: Q8Weight) -> Tensor:
    """(N / 8, K / 32, 272) uint8: d[8] fp16, then 8 vectors: lane c byte b of vector t holds q(c, 4t + b)."""
    n, k = w.shape
    codes = _blocks(w.qs, n).view(-1, BLOCK_ROWS, k // GROUP, 8, 4)  # (B, c, g, t, b)
    qs = codes.permute(0, 2, 3, 1, 4).reshape(-1, k // GROUP, 256).view(torch.uint8)
    return torch.cat((_scales(w.d, n), qs), dim=-1).contiguous()


def _check(k: int, what: str) -> None:
    if k % GROUP:
        raise ValueError(f"{what}: K={k} is not a multiple of the group size {GROUP}")
    if not kernels.available():  # loads the library on first use
        raise RuntimeError(f"{what}: {kernels.unavailable_reason()}")


class Q4Q8Form(WeightForm):
    name = "q4q8"

    def __init__(self, weight: Q4Weight):
        _check(weight.shape[1], "q4q8 form")
        self.source: Q4Weight = weight
        self.shape = weight.shape
        self.packed = pack_q4(weight)
        self._mm = torch.ops.kvserve.q4_1_mm.default  # the overload itself: no resolution per call

    def __call__(self, x: Tensor) -> Tensor:
        return self._mm(x, self.packed, self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


class Q8Q8Form(WeightForm):
    name = "q8q8"

    def __init__(self, weight: Q8Weight):
        _check(weight.shape[1], "q8q8 form")
        self.source: Q8Weight = weight
        self.shape = weight.shape
        self.packed = pack_q8(weight)
        self._mm = torch.ops.kvserve.q8_0_mm.default

    def __call__(self, x: Tensor) -> Tensor:
        return self._mm(x, self.packed, self.shape[0])

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


class F32Form(WeightForm):
    """Dense weights where torch's matmul would pick a kernel by row count (gemv for one row,
    blocked gemm beyond), so that a row's logits would change with its batch: packed once in
    panels of 16 outputs, every output summed over K in order whatever M (dense_mm.cpp)."""
    name = "f32"

    def __init__(self, weight: Tensor):
        if not kernels.available():  # loads the library on first use
            raise RuntimeError(f"f32 form: {kernels.unavailable_reason()}")
        self.source: Tensor = weight.detach().float()
        self.shape = (weight.shape[0], weight.shape[1])
        self.packed = torch.ops.kvserve.dense_pack(self.source)
        self._mm = torch.ops.kvserve.dense_mm.default

    def __call__(self, x: Tensor) -> Tensor:
        return self._mm(x, self.packed, self.shape[0])

    def dequantize(self) -> Tensor:
        return self.source

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's activation rule per row and group of 32, in float32: d = absmax / 127,
    q = round half to even (x * (1 / d)). Returns q (M, K / 32, 32) float64 and d (M, K / 32) float64."""
    m, k = x.shape
    groups = x.float().view(m, k // GROUP, GROUP)
    d = groups.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(groups * inv[..., None])  # torch.round rounds half to even
    return q.double(), d.double()


def q4q8_reference(x: Tensor, w: Q4Weight) -> Tensor:
    """float64 (M, N): quantized-then-dequantized activations times the exact Q4_1 matrix."""
    n, k = w.shape
    q, d = quantize_activations(x)
    xd = (q * d[..., None]).view(x.shape[0], k)
    wd = w.codes().double().view(n, k // GROUP, GROUP) * w.d.double()[..., None] + w.m.double()[..., None]
    return xd @ wd.view(n, k).t()


def q8q8_reference(x: Tensor, w: Q8Weight) -> Tensor:
    n, k = w.shape
    q, d = quantize_activations(x)
    xd = (q * d[..., None]).view(x.shape[0], k)
    return xd @ (w.qs.double().view(n, k // GROUP, GROUP) * w.d.double()[..., None]).view(n, k).t()

