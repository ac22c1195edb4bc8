"""What the kernel tests share: the library check (fails under CI, skips elsewhere) and weights."""
from __future__ import annotations

import os

import pytest
import torch

from model import kernels
from model.quantized import Q4Weight, Q8Weight, quantize_q4


def require_kernels() -> None:
    """CI builds the library (`make install`): there a missing one fails; a bare checkout skips."""
    if kernels.available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"kvserve kernels unavailable under CI: {kernels.unavailable_reason()}")
    pytest.skip(f"kvserve kernels unavailable: {kernels.unavailable_reason()}")


def random_q4(n: int, k: int, seed: int) -> Q4Weight:
    gen = torch.Generator().manual_seed(seed)
    return quantize_q4(torch.randn(n, k, generator=gen) / k ** 0.5 + 0.02 * torch.randn(n, 1, generator=gen))


def random_q8(n: int, k: int, seed: int) -> Q8Weight:
    """Codes over the whole int8 range, -128 included (the kernel's sign trick must survive it)."""
    gen = torch.Generator().manual_seed(seed)
    qs = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).half()
    return Q8Weight(qs, d)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows of different scales, a few outliers, and one group of exact zeros (d_x = 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    x[:, 5] *= 30
    x[0, :32] = 0
    return x
