"""Quantized weight tensors as a checkpoint holds them, before any kernel packs them.

    Q4Weight    GGUF Q4_1: rows cut in groups of 32, w = d * q + m, q in 0..15, d and m float16
    Q8Weight    GGUF Q8_0: groups of 32, w = d * q, q int8, d float16 (token embeddings here)
    Int8Weight  one float32 scale per row, w = s * q, q in -127..127 (what `_weight_int8pack_mm` reads)

A checkpoint weight is one of these or a plain dense Tensor (`WeightT`). All are (N, K): N output
rows, K inputs. Each can be dequantized exactly (float32), cut into row ranges and concatenated
along rows, so fused projections and attention variants work on codes, not on rounded floats.
`quantize_q4`, `quantize_q8` and `quantize_int8_rows` make them from dense weights, with llama.cpp's
Q4_1 rule (min and max of each group), its Q8_0 rule (absmax of each group) and a symmetric per-row
absmax. Kernels live in model/weight_forms.py and model/kernel_forms.py.
Q4Weight keeps GGUF's byte layout: per group 16 bytes, low nibbles the first 16 weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GROUP = 32  # weights per Q4_1 / Q8_0 group, along K


def _check_groups(k: int, what: str) -> None:
    if k % GROUP:
        raise ValueError(f"{what}: K={k} is not a multiple of the group size {GROUP}")


@dataclass(frozen=True, slots=True)
class Q4Weight:
    qs: Tensor  # (N, K / 2) uint8: per group, byte j holds q[j] (low nibble) and q[j + 16] (high)
    d: Tensor   # (N, K / 32) float16 scale
    m: Tensor   # (N, K / 32) float16 minimum

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 2

    def codes(self) -> Tensor:
        """(N, K) uint8 in 0..15."""
        n, k = self.shape
        groups = self.qs.view(n, k // GROUP, GROUP // 2)
        return torch.cat((groups & 0x0F, groups >> 4), dim=-1).view(n, k)

    def dequantize(self) -> Tensor:
        n, k = self.shape
        q = self.codes().view(n, k // GROUP, GROUP).float()
        return (q * self.d.float()[..., None] + self.m.float()[..., None]).view(n, k)

    def rows(self, start: int, stop: int) -> Q4Weight:
        return Q4Weight(self.qs[start:stop], self.d[start:stop], self.m[start:stop])

    def permute_rows(self, order: Tensor) -> Q4Weight:
        return Q4Weight(self.qs[order], self.d[order], self.m[order])

    @staticmethod
    def cat(parts: list[Q4Weight]) -> Q4Weight:
        return Q4Weight(torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), torch.cat([p.m for p in parts]))


@dataclass(frozen=True, slots=True)
class Q8Weight:
    qs: Tensor  # (N, K) int8
    d: Tensor   # (N, K / 32) float16

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1]

    def dequantize(self) -> Tensor:
        n, k = self.shape
        return (self.qs.view(n, k // GROUP, GROUP).float() * self.d.float()[..., None]).view(n, k)

    def lookup(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows `ids` (any shape) dequantized exactly: (*ids.shape, K) in dtype."""
        k = self.qs.shape[1]
        q = self.qs[ids].view(*ids.shape, k // GROUP, GROUP).float()
        return (q * self.d[ids].float()[..., None]).view(*ids.shape, k).to(dtype)

    def rows(self, start: int, stop: int) -> Q8Weight:
        return Q8Weight(self.qs[start:stop], self.d[start:stop])

    def permute_rows(self, order: Tensor) -> Q8Weight:
        return Q8Weight(self.qs[order], self.d[order])

    @staticmethod
    def cat(parts: list[Q8Weight]) -> Q8Weight:
        return Q8Weight(torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]))


@dataclass(frozen=True, slots=True)
class Int8Weight:
    qs: Tensor     # (N, K) int8
    scale: Tensor  # (N,) float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1]

    def dequantize(self) -> Tensor:
        return self.qs.float() * self.scale[:, None]

    def rows(self, start: int, stop: int) -> Int8Weight:
        return Int8Weight(self.qs[start:stop], self.scale[start:stop])

    def permute_rows(self, order: Tensor) -> Int8Weight:
        return Int8Weight(self.qs[order], self.scale[order])

    @staticmethod
    def cat(parts: list[Int8Weight]) -> Int8Weight:
        return Int8Weight(torch.cat([p.qs for p in parts]), torch.cat([p.scale for p in parts]))


QuantizedWeight = Q4Weight | Q8Weight | Int8Weight
WeightT = Tensor | QuantizedWeight


def dequantize(w: WeightT) -> Tensor:
    """float32 (N, K) of any checkpoint weight."""
    return w.float() if isinstance(w, Tensor) else w.dequantize()


def weight_rows(w: WeightT, start: int, stop: int) -> WeightT:
    return w[start:stop] if isinstance(w, Tensor) else w.rows(start, stop)


def permute_weight_rows(w: WeightT, order: Tensor) -> WeightT:
    return w[order] if isinstance(w, Tensor) else w.permute_rows(order)


def cat_rows(parts: list[WeightT]) -> WeightT:
    """Concatenate along N; parts of different kinds meet as dense float32."""
    kinds = {type(p) for p in parts}
    if len(kinds) == 1 and isinstance(parts[0], Q4Weight | Q8Weight | Int8Weight):
        return type(parts[0]).cat(parts)  # type: ignore[arg-type]
    if len(kinds) == 1:
        return torch.cat(parts)  # type: ignore[arg-type]
    return torch.cat([dequantize(p) for p in parts])


def quantize_q4(w: Tensor) -> Q4Weight:
    """llama.cpp's Q4_1 rule per group of 32: m = min, d = (max - min) / 15, q = round((w - m) / d).

    d is used in float32 to compute q, then stored as float16, as ggml does; a weight that is
    already a Q4_1 value (a group spanning codes 0..15) comes back to the same d, m and q.
    """
    n, k = w.shape
    _check_groups(k, "Q4 quantization")
    groups = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = ((groups - lo[..., None]) * inv[..., None] + 0.5).floor().clamp_(0, 15).to(torch.uint8)
    qs = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return Q4Weight(qs.reshape(n, k // 2).contiguous(), d.half(), lo.half())


def quantize_q8(w: Tensor) -> Q8Weight:
    """llama.cpp's Q8_0 rule per group of 32: d = absmax / 127 (stored float16), q = round(w / d)."""
    n, k = w.shape
    _check_groups(k, "Q8 quantization")
    groups = w.float().reshape(n, k // GROUP, GROUP)
    d = groups.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    qs = torch.round(groups * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return Q8Weight(qs.reshape(n, k).contiguous(), d.half())


def quantize_int8_rows(w: Tensor) -> Int8Weight:
    """Symmetric int8 per output row: s = absmax / 127, q = round(w / s)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    qs = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(qs, scale)


def q4_from_gguf(blocks: np.ndarray, n: int, k: int) -> Q4Weight:
    """GGUF Q4_1 data (N, K / 32 * 20 bytes: d, m float16, 16 bytes of nibbles per group), copied."""
    _check_groups(k, "GGUF Q4_1 tensor")
    raw = torch.from_numpy(np.array(blocks, dtype=np.uint8)).view(n, k // GROUP, 20)
    d = raw[..., 0:2].contiguous().view(torch.float16).view(n, k // GROUP)
    m = raw[..., 2:4].contiguous().view(torch.float16).view(n, k // GROUP)
    qs = raw[..., 4:].reshape(n, k // 2)
    return Q4Weight(qs, d, m)


def q8_from_gguf(blocks: np.ndarray, n: int, k: int) -> Q8Weight:
    """GGUF Q8_0 data (N, K / 32 * 34 bytes: d float16, 32 int8 per group), copied."""
    _check_groups(k, "GGUF Q8_0 tensor")
    raw = torch.from_numpy(np.array(blocks, dtype=np.uint8)).view(n, k // GROUP, 34)
    d = raw[..., 0:2].contiguous().view(torch.float16).view(n, k // GROUP)
    qs = raw[..., 2:].contiguous().view(torch.int8).view(n, k)
    return Q8Weight(qs, d)
