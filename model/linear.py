"""The network's weight modules: `Linear` (two weight forms, picked by row count) and `Embedding`.

`Linear` runs y = x W^T (+ b) with `small` for at most `crossover` rows and `large` beyond: a
weight-only int4 / int8 kernel streams fewer bytes and wins for a few decoding sequences, a dense
or float16 kernel wins for large batches and prefill (model/quantization.py picks both and the
crossover). With one form, `small is large`. The output dtype is the form's (see weight_forms).
`Embedding` looks token rows up in a dense matrix or in Q8_0 codes (exact, no dense copy).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model.quantized import Q8Weight, WeightT
from model.weight_forms import DenseForm, WeightForm


class Linear(nn.Module):
    def __init__(self, small: WeightForm, large: WeightForm | None = None, *, crossover: int = 0,
                 bias: Tensor | None = None):
        super().__init__()
        self.small, self.large = small, large if large is not None else small
        if self.small.shape != self.large.shape:
            raise ValueError(f"forms of one linear differ in shape: {self.small.shape} vs {self.large.shape}")
        self.out_features, self.in_features = small.shape
        self.crossover = crossover
        # A dense linear registers its weight (and bias) as parameters, frozen: state_dict() lists
        # them and a training loop (kvserve convert) can unfreeze them; the form reads the same object.
        if isinstance(small, DenseForm) and self.large is small:
            small.weight = small.source = nn.Parameter(small.weight, requires_grad=False)
            self.weight = small.weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def source(self) -> WeightT:
        """The checkpoint weight this linear runs, as loaded (every form keeps the same one)."""
        return self.small.source

    def form_for(self, rows: int) -> WeightForm:
        return self.small if rows <= self.crossover else self.large

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        out = self.form_for(x2.shape[0])(x2)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def forms(self) -> tuple[WeightForm, ...]:
        return (self.small,) if self.small is self.large else (self.small, self.large)

    def extra_repr(self) -> str:
        names = "/".join(f.name for f in self.forms)
        return f"{self.in_features} -> {self.out_features}, {names}, crossover={self.crossover}"


class Embedding(nn.Module):
    def __init__(self, weight: WeightT, dtype: torch.dtype):
        super().__init__()
        if not isinstance(weight, Tensor | Q8Weight):
            raise TypeError(f"an embedding is a dense or Q8_0 weight, not {type(weight).__name__}")
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False) if isinstance(weight, Tensor) else weight
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device if isinstance(self.weight, Tensor) else self.weight.qs.device

    def forward(self, ids: Tensor) -> Tensor:
        if isinstance(self.weight, Tensor):
            return self.weight[ids]
        return self.weight.lookup(ids, self.dtype)
