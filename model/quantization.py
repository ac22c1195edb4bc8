"""`--quantization`: which weight forms (model/weight_forms.py) run, per checkpoint, device and CPU.

    none   dense weights in the model's dtype (GGUF tensors dequantized): the reference
    q4     4-bit groups of 32 on the int4 kernel: GGUF Q4_1 tensors exactly as stored, dense
           weights quantized by Q4_1's rule; Q8_0 tensors on int8 per row; the LM head on fp16
    int8   every linear int8 per output row (GGUF tensors requantized from their values); head fp16
    fp16   every linear as float16 (fbgemm), float32 activations
    auto   CPU with kvserve's kernels built (model/kernels): every weight on them at every row
           count, so a row's result never depends on its batch: Q4_1 -> q4q8, Q8_0 -> q8q8 (the
           LM head too), dense -> f32. CUDA: none. CPU without the kernels: as tuned (logged).
    tuned  opt-in, not batch-invariant: the checkpoint's own quantized tensors (Q4_1 -> q4, Q8_0 ->
           int8) for batches of at most `crossover` rows, the faster of dense and fp16 for larger
           ones; both and the crossover measured at load (`tune`, a few hundred ms, logged) unless
           pinned. A checkpoint without quantized tensors runs none.

The LM head runs fp16 wherever fbgemm exists: measured as fast as int8 at every batch size here
(BENCHMARKS.md), and it returns float32 logits where the int8 kernel rounds them to bfloat16.
A form whose kernel this torch build or device lacks falls back to dense (dequantized) weights,
logged once: CUDA runs every option that way.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from model import kernels
from model.kernel_forms import F32Form, Q4Q8Form, Q8Q8Form
from model.linear import Embedding, Linear
from model.quantized import (
    GROUP,
    Int8Weight,
    Q4Weight,
    Q8Weight,
    WeightT,
    cat_rows,
    dequantize,
    quantize_int8_rows,
    quantize_q4,
    quantize_q8,
)
from model.weight_forms import DenseForm, Fp16Form, Int8Form, Q4Form, WeightForm, kernel_available

log = logging.getLogger("kvserve.quantization")

QUANTIZATIONS = ("auto", "tuned", "none", "q4", "int8", "fp16")
TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)  # batch sizes the crossover is measured at
_warned: set[tuple[str, str]] = set()


def parse_quantization(value: str) -> str:
    if value not in QUANTIZATIONS:
        raise ValueError(f"invalid quantization {value!r}: use one of {', '.join(QUANTIZATIONS)}")
    return value


@dataclass(frozen=True, slots=True)
class WeightPolicy:
    """What `quantization` resolved to: the form for small batches, for large ones, the head's,
    and the crossover (None: measure at load; small == large: one form, no crossover)."""
    quantization: str
    small: str       # native | kernel | q4 | int8 | fp16 | dense | q4q8 | q8q8 | f32 ("native": the
                     # checkpoint's own quantization on ATen's kernels; "kernel": on kvserve's)
    large: str
    head_small: str
    head_large: str
    device: str      # where the weights live, e.g. cpu or cuda:0
    crossover: int | None = None

    def form(self, kind: str, w: WeightT, dtype: torch.dtype) -> WeightForm:
        if kind == "native":
            kind = "q4" if isinstance(w, Q4Weight) else "int8" if isinstance(w, Q8Weight | Int8Weight) else "dense"
        if kind == "kernel":
            kind = "q4q8" if isinstance(w, Q4Weight) else "q8q8" if isinstance(w, Q8Weight) else "f32"
        if kind == "q4" and (isinstance(w, Q8Weight | Int8Weight) or w.shape[1] % GROUP):
            kind = "int8"  # 8-bit stays 8-bit; and the int4 kernel needs whole groups along K
        if kind == "q4q8" and isinstance(w, Q8Weight | Int8Weight):
            kind = "q8q8"  # kvserve's kernels (model/kernel_forms.py): 8-bit stays 8-bit there too
        if kind in ("q4q8", "q8q8") and w.shape[1] % GROUP:
            kind = "f32"  # they need whole groups along K
        if not kernel_available(kind, torch.device(self.device).type):
            if (kind, self.device) not in _warned:
                _warned.add((kind, self.device))
                reason = kernels.unavailable_reason() if kind in ("q4q8", "q8q8", "f32") else None
                why = f"({reason})" if reason else "in this torch build"
                log.warning("no %s kernel on %s %s: running dequantized dense weights", kind, self.device, why)
            kind = "dense"
        if kind == "dense":
            return DenseForm(dequantize(w).to(self.device, dtype) if not isinstance(w, Tensor) else w.to(self.device, dtype))
        if kind == "fp16":
            return Fp16Form(dequantize(w))
        if kind == "int8":
            return Int8Form(w if isinstance(w, Int8Weight) else quantize_int8_rows(dequantize(w)))
        if kind == "q4q8":
            return Q4Q8Form(w if isinstance(w, Q4Weight) else quantize_q4(dequantize(w)))
        if kind == "q8q8":
            return Q8Q8Form(w if isinstance(w, Q8Weight) else quantize_q8(dequantize(w)))
        if kind == "f32":
            return F32Form(dequantize(w) if not isinstance(w, Tensor) else w)
        return Q4Form(w if isinstance(w, Q4Weight) else quantize_q4(dequantize(w)))

    def linear(self, parts: list[WeightT], dtype: torch.dtype, *, bias: Tensor | None = None, head: bool = False) -> Linear:
        """One Linear from checkpoint weights fused along their rows (Q, K, V or gate, up)."""
        weight = parts[0] if len(parts) == 1 else cat_rows(parts)
        small_kind, large_kind = (self.head_small, self.head_large) if head else (self.small, self.large)
        small = self.form(small_kind, weight, dtype)
        large = small if large_kind == small_kind else self.form(large_kind, weight, dtype)
        return Linear(small, large, bias=bias)

    def embedding(self, weight: WeightT, dtype: torch.dtype) -> Embedding:
        """Q8_0 embeddings are looked up from their codes on CPU; anything else as a dense matrix."""
        if self.quantization != "none" and isinstance(weight, Q8Weight) and self.device == "cpu":
            return Embedding(weight, dtype)
        dense = weight if isinstance(weight, Tensor) else dequantize(weight)
        return Embedding(dense.to(self.device, dtype), dtype)

    def set_crossovers(self, body: list[Linear], head: Linear) -> str:
        """Measure (or pin) where the small forms stop winning; the result in words (`describe`)."""
        if self.crossover is not None:
            body_rows = head_rows = self.crossover
        else:
            body_rows = tune(body[:5]) if body[0].small is not body[0].large else 0
            head_rows = tune([head]) if head.small is not head.large else 0
        for linear in body:
            linear.crossover = body_rows
        head.crossover = head_rows
        weights = describe(body[0], head)
        log.info("weights: %s (quantization %s)", weights, self.quantization)
        return weights


def describe(linear: Linear, head: Linear) -> str:
    """e.g. 'q4 up to 8 rows, else fp16; lm head fp16' -- the kvserve_model_info `weights` label."""
    def one(lin: Linear) -> str:
        if lin.small is lin.large or lin.small.name == lin.large.name:
            return lin.large.name
        if lin.crossover == 0:
            return lin.large.name
        return f"{lin.small.name} up to {lin.crossover} rows, else {lin.large.name}"
    return f"{one(linear)}; lm head {one(head)}"


def _time(forms: list[WeightForm], rows: int, repeats: int) -> float:
    """Seconds of one pass through `forms` at `rows` rows (CPU), best of `repeats`."""
    inputs = [torch.randn(rows, form.shape[1]) for form in forms]
    samples = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        for form, x in zip(forms, inputs):
            form(x)
        if i:  # the first pass warms up
            samples.append(time.perf_counter() - t0)
    return min(samples)  # the least disturbed pass: other processes only ever add time


@torch.inference_mode()
def tune(linears: list[Linear], rows: tuple[int, ...] = TUNE_ROWS, repeats: int = 5) -> int:
    """The largest measured row count up to which the small forms beat the large ones at every
    measured size (0: the large forms win from one row on)."""
    crossover, report = 0, []
    for n in rows:
        small = _time([lin.small for lin in linears], n, repeats)
        large = _time([lin.large for lin in linears], n, repeats)
        report.append(f"{n}: {small * 1e3:.2f}/{large * 1e3:.2f}")
        if small >= large:
            break
        crossover = n
    names = f"{linears[0].small.name}/{linears[0].large.name}"
    log.info("crossover %s for %d linears: %d rows (ms %s per row count: %s)", names, len(linears), crossover,
             names, ", ".join(report))
    return crossover


def resolve_policy(quantization: str, device: torch.device | str, dtype: torch.dtype,
                   weights: dict[str, WeightT], crossover: int | None = None) -> WeightPolicy:
    """The policy `quantization` means for these weights on this device; `crossover` pins tuned's."""
    quantization = parse_quantization(quantization)
    if crossover is not None and crossover < 0:
        raise ValueError(f"crossover={crossover} is out of range: must be >= 0 rows")
    dev = str(torch.device(device))
    head = "fp16" if kernel_available("fp16", torch.device(dev).type) else "dense"
    if quantization == "none":
        return WeightPolicy(quantization, "dense", "dense", "dense", "dense", dev)
    if quantization in ("q4", "int8"):
        return WeightPolicy(quantization, quantization, quantization, head, head, dev)
    if quantization == "fp16":
        return WeightPolicy(quantization, "fp16", "fp16", "fp16", "fp16", dev)
    cpu = torch.device(dev).type == "cpu"
    if quantization == "auto" and cpu:
        if kernels.available():
            return WeightPolicy(quantization, "kernel", "kernel", "kernel", "kernel", dev)
        log.warning("quantization auto runs as tuned, whose rows depend on their batch: %s", kernels.unavailable_reason())
    quantized = any(isinstance(w, Q4Weight | Q8Weight) for w in weights.values())
    if not cpu or not quantized:
        return WeightPolicy(quantization, "dense", "dense", "dense", "dense", dev)
    return WeightPolicy(quantization, "native", _faster_large_form(weights, dtype), head, head, dev, crossover)


@torch.inference_mode()
def _faster_large_form(weights: dict[str, WeightT], dtype: torch.dtype, rows: int = 64) -> str:
    """dense (the model's dtype) or fp16, whichever runs layer 0's projections faster at `rows`
    rows, on random matrices of their shapes. fp16 only where fbgemm exists."""
    if not kernel_available("fp16", "cpu"):
        return "dense"
    shapes = [tuple(w.shape) for name, w in weights.items() if name.startswith("layers.0.") and len(w.shape) == 2]
    matrices = [torch.randn(n, k) / k ** 0.5 for n, k in shapes]
    dense = _time([DenseForm(w.to(dtype)) for w in matrices], rows, 5)
    fp16 = _time([Fp16Form(w) for w in matrices], rows, 5)
    choice = "fp16" if fp16 < dense else "dense"
    log.info("large batches: %s (layer 0 at %d rows: dense %s %.2f ms, fp16 %.2f ms)", choice, rows,
             str(dtype).removeprefix("torch."), dense * 1e3, fp16 * 1e3)
    return choice
