"""Calibrated initialisation of a converted model's K/V projections, one layer at a time.

Mean-pooling the K/V heads of a group (GQA paper, section 3.1) ignores what the heads are used
for. Here each layer's merged K and V projections are instead fitted so that the layer's attention
output, on real activations, is as close as possible to the original's: a least-squares problem

    min over Wk, Wv of  sum_t || attn_student(x_t) - attn_teacher(x_t) ||^2 / sum_t || attn_teacher(x_t) ||^2

where x_t are the teacher's own inputs to the layer on calibration text, and the query and output
projections stay the teacher's. In V it is linear least squares; in K it is not (the scores pass
through the softmax), so it is solved by Adam from the mean-pooled start, gradients through the
flash backward. Layers are independent given the teacher's inputs, so they are fitted one after
another while the teacher's hidden states advance: memory holds one layer's activations.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from model.transformer import Attention, Block, Transformer


def _layer_inputs(teacher: Transformer, i: int, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer i's attention input x, the teacher's attention output, and the hidden state after the layer."""
    layer = cast(Block, teacher.layers[i])
    x = layer.attention_norm(h)  # (N, T, dim)
    attn = layer.attention(x, cos, sin, teacher.attention)
    h = h + attn
    return x, attn, h + layer.feed_forward(layer.ffn_norm(h))


def fit_kv(teacher: Transformer, student: Transformer, sequences: Tensor, *, epochs: int, lr: float,
           batch_size: int, seed: int, on_layer: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Fit every layer's K/V projections of `student` (in place) on `sequences` (N, T) of token ids.

    Returns each layer's relative squared error after fitting. `on_layer(i, before, after)` is
    called after each layer with its relative error at the start and the end.
    """
    T = sequences.shape[1]
    cos, sin = teacher._rope(torch.arange(T, device=teacher.device), T - 1)
    gen = torch.Generator().manual_seed(seed)
    errors = []
    with torch.no_grad():
        h = teacher.tok_embeddings(sequences.to(teacher.device))  # (N, T, dim)
    for i in range(len(student.layers)):
        with torch.no_grad():
            x, target, h = _layer_inputs(teacher, i, h, cos, sin)
        attention = cast(Block, student.layers[i]).attention
        params = list(attention.wkv.parameters())  # the fused K/V weight (and bias)
        for p in params:
            p.requires_grad_(True)
        norm = target.pow(2).sum()
        before = _relative_error(attention, x, target, norm, cos, sin, batch_size)
        steps = epochs * -(-len(x) // batch_size)
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for _ in range(epochs):
            for rows in torch.randperm(len(x), generator=gen).split(batch_size):
                out = attention(x[rows], cos, sin, "flash")
                loss = (out - target[rows]).pow(2).sum() * (len(x) / len(rows) / norm)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        errors.append(_relative_error(attention, x, target, norm, cos, sin, batch_size))
        if on_layer is not None:
            on_layer(i, before, errors[-1])
    return errors


@torch.no_grad()
def _relative_error(attention: Attention, x: Tensor, target: Tensor, norm: Tensor, cos: Tensor, sin: Tensor,
                    batch_size: int) -> float:
    total = sum(float((attention(x[s:s + batch_size], cos, sin, "flash") - target[s:s + batch_size]).pow(2).sum())
                for s in range(0, len(x), batch_size))
    return total / float(norm)
