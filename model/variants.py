"""Attention variants of a checkpoint: change how many K/V heads it has.

`variant` names: `native` (as stored), `mha` (n_kv_heads = n_heads), `gqa-N` (N K/V heads),
`mqa` (one). Going to fewer K/V heads mean-pools the K and V projection heads of each group
(Ainslie et al. 2023, "GQA", section 3.1); without uptraining this loses quality. Going to more
repeats each head (exact: the logits do not change). A variant differs from its model in one
module per layer, the fused K/V projection (`wkv`); every other module is shared, not copied.
Quantized K/V weights are dequantized, regrouped and quantized again in the same kind (a
converted variant is approximate anyway); dense ones stay exact.

A variant can also come from a converted checkpoint directory (`kvserve convert` distils one that
keeps its quality): `with_converted` takes its K/V projections, and its Q and O projections where
they differ from the served model's (`kvserve convert --train attention`), and shares the rest
with the served model, after checking that the rest is the same.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.config import ModelConfig, valid_kv_heads
from model.linear import Linear
from model.quantized import Int8Weight, Q4Weight, WeightT, cat_rows, dequantize, quantize_int8_rows, quantize_q4, weight_rows

if TYPE_CHECKING:
    from model.transformer import Transformer

KV_TENSORS = ("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")
QO_TENSORS = ("attention.wq.weight", "attention.wq.bias", "attention.wo.weight")


def parse_variant(variant: str, n_heads: int, native_kv_heads: int) -> int:
    """The K/V head count a variant name asks for; a clear error for a bad name or divisor."""
    choices = valid_kv_heads(n_heads)
    if variant == "native":
        return native_kv_heads
    if variant == "mha":
        return n_heads
    if variant == "mqa":
        return 1
    if variant.startswith("gqa-"):
        try:
            n = int(variant[4:])
        except ValueError:
            n = None
        if n in choices:
            return n
    raise ValueError(
        f"invalid variant {variant!r}: use native, mha, mqa or gqa-N with N dividing n_heads={n_heads} "
        f"(valid N: {', '.join(map(str, choices))})"
    )


def _regroup_heads(w: Tensor, n_from: int, n_to: int) -> Tensor:
    """Rows of a K or V projection (n_from * D, ...) regrouped into n_to heads."""
    head_dim = w.shape[0] // n_from
    heads = w.reshape(n_from, head_dim, *w.shape[1:])
    if n_to < n_from:  # mean-pool each group of n_from // n_to consecutive heads
        heads = heads.reshape(n_to, n_from // n_to, head_dim, *w.shape[1:]).float().mean(dim=1).to(w.dtype)
    elif n_to > n_from:  # every query head keeps seeing the same K/V
        heads = heads.repeat_interleave(n_to // n_from, dim=0)
    return heads.reshape(n_to * head_dim, *w.shape[1:])


def regroup_kv(w: Tensor, cfg: ModelConfig, n_kv_heads: int) -> Tensor:
    """One K or V projection (or bias) with its heads regrouped to n_kv_heads. Converting between
    two counts where neither divides the other goes through MHA, which is exact in one direction
    and the mean-pool of the original groups in the other."""
    if n_kv_heads % cfg.n_kv_heads and cfg.n_kv_heads % n_kv_heads:
        return _regroup_heads(_regroup_heads(w, cfg.n_kv_heads, cfg.n_heads), cfg.n_heads, n_kv_heads)
    return _regroup_heads(w, cfg.n_kv_heads, n_kv_heads)


def _requantize_like(like: WeightT, dense: Tensor) -> WeightT:
    """`dense` (float32) in the kind of checkpoint weight `like` is."""
    if isinstance(like, Q4Weight):
        return quantize_q4(dense)
    if isinstance(like, Int8Weight):
        return quantize_int8_rows(dense)
    assert isinstance(like, Tensor), type(like).__name__
    return dense.to(like.dtype)


def _convert_kv(w: WeightT, cfg: ModelConfig, n_kv_heads: int) -> WeightT:
    """A fused K/V weight (K rows, then V rows) with both halves regrouped to n_kv_heads."""
    rows = cfg.n_kv_heads * cfg.head_dim
    if isinstance(w, Tensor):  # dense: exact, in its own dtype
        return torch.cat([regroup_kv(w[s:s + rows], cfg, n_kv_heads) for s in (0, rows)])
    return cat_rows([_requantize_like(w, regroup_kv(dequantize(weight_rows(w, s, s + rows)), cfg, n_kv_heads))
                     for s in (0, rows)])


def _in_kind_of(like: WeightT, dense: Tensor) -> WeightT:
    """`dense` as it is for a dense form, quantized again like `like` for a quantized one."""
    return dense if isinstance(like, Tensor) else _requantize_like(like, dense.float())


def _with_forms_of(linear: Linear, convert: Callable[[WeightT], WeightT], bias: Tensor | None) -> Linear:
    """A Linear with each of `linear`'s forms rebuilt, in its own kind, from `convert(its source)`."""
    forms = {id(form): type(form)(convert(form.source)) for form in linear.forms}  # type: ignore[call-arg]
    return Linear(forms[id(linear.small)], forms[id(linear.large)], crossover=linear.crossover, bias=bias)


def _with_attention(model: Transformer, cfg: ModelConfig,
                    projections: list[tuple[Linear, Linear, Linear]]) -> Transformer:
    """`model` with config `cfg` and each layer's (wq, wkv, wo) from `projections`, sharing every
    other module (and whichever of those projections are `model`'s own)."""
    from model.transformer import Attention, Block, Transformer

    layers = [Block(layer.attention_norm, Attention(cfg, wq, wkv, wo), layer.ffn_norm, layer.feed_forward)
              for layer, (wq, wkv, wo) in zip(model.blocks, projections)]
    return Transformer(cfg, embedding=model.tok_embeddings, layers=layers, norm=model.norm, output=model.output,
                       attention=model.attention, weights=model.weights).eval()


@torch.no_grad()
def with_variant(model: Transformer, variant: str) -> Transformer:
    """A model of `variant` built from `model`: shares every module but the K/V projections."""
    cfg = model.config
    n_kv = parse_variant(variant, cfg.n_heads, cfg.n_kv_heads)
    if n_kv == cfg.n_kv_heads:
        return model
    wkvs = []
    for layer in model.blocks:
        wkv = layer.attention.wkv
        bias = None if wkv.bias is None else torch.cat([regroup_kv(half, cfg, n_kv) for half in wkv.bias.data.chunk(2)])
        wkvs.append(_with_forms_of(wkv, lambda w: _convert_kv(w.data if isinstance(w, Tensor) else w, cfg, n_kv), bias))
    return _with_attention(model, cfg.with_kv_heads(n_kv),
                           [(layer.attention.wq, wkv, layer.attention.wo) for layer, wkv in zip(model.blocks, wkvs)])


def split_variant(spec: str) -> tuple[str, str | None]:
    """`NAME=DIR` (a converted checkpoint served under NAME) -> (NAME, DIR); a variant name -> (name, None)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (spec, None)


@torch.no_grad()
def with_converted(model: Transformer, path: str | Path, name: str) -> Transformer:
    """`model` with the attention projections of the checkpoint directory `path` (e.g. written by
    `kvserve convert`): its K/V projections always, its Q and O projections in the layers where
    they differ from `model`'s; every other module is shared with `model`.

    The directory must be the same network with another K/V head count and, but for its attention
    projections, the same tensors (compared exactly, dequantized, in `model`'s dtype); a `name`
    that is a variant word (mha, mqa, gqa-N) must match its K/V head count. ValueError otherwise,
    naming the first difference. Projections taken from the directory run in the kind of form the
    served model's do.
    """
    from model.hf_loader import hf_tensor_name, open_hf
    from model.transformer import checkpoint_weights

    checkpoint = open_hf(path)
    cfg, base_cfg = checkpoint.config, model.config
    if cfg.with_kv_heads(base_cfg.n_kv_heads) != base_cfg:
        diff = [f"{f.name}={getattr(cfg, f.name)} (served model: {getattr(base_cfg, f.name)})" for f in fields(cfg)
                if f.name != "n_kv_heads" and getattr(cfg, f.name) != getattr(base_cfg, f.name)]
        raise ValueError(f"variant {name}={path} is not a variant of the served model: {', '.join(diff)}")
    if re.fullmatch(r"mha|mqa|gqa-[0-9]+", name) and parse_variant(name, cfg.n_heads, base_cfg.n_kv_heads) != cfg.n_kv_heads:
        raise ValueError(f"variant {name}={path}: the checkpoint has {cfg.n_kv_heads} K/V heads, not what "
                         f"{name!r} means; name it after its head count or give it another name")
    theirs = checkpoint.weights(model.dtype, progress=False)
    ours = checkpoint_weights(model)

    def same(tensor_name: str) -> bool:
        if tensor_name not in theirs:
            return True  # a bias neither has
        mine = ours[tensor_name]
        mine = mine if isinstance(mine, Tensor) else dequantize(mine).to(model.dtype)
        return torch.equal(theirs[tensor_name].to(model.device), mine)

    for tensor_name in theirs:
        if not tensor_name.endswith(KV_TENSORS + QO_TENSORS) and not same(tensor_name):
            raise ValueError(f"variant {name}={path}: tensor {hf_tensor_name(tensor_name)!r} differs from the served "
                             f"model's; only attention projections may differ (serve it on its own: --model {path})")

    def taken(linear: Linear, weight: Tensor, bias: Tensor | None) -> Linear:
        return _with_forms_of(linear, partial(_in_kind_of, dense=weight.to(model.device)),
                              None if bias is None else bias.to(model.device))

    projections = []
    for i, layer in enumerate(model.blocks):
        p, attn = f"layers.{i}.attention.", layer.attention
        kv_bias = torch.cat([theirs[p + "wk.bias"], theirs[p + "wv.bias"]]) if cfg.qkv_bias else None
        wkv = taken(attn.wkv, torch.cat([theirs[p + "wk.weight"], theirs[p + "wv.weight"]]), kv_bias)
        wq = attn.wq if same(p + "wq.weight") and same(p + "wq.bias") else \
            taken(attn.wq, theirs[p + "wq.weight"], theirs.get(p + "wq.bias"))
        wo = attn.wo if same(p + "wo.weight") else taken(attn.wo, theirs[p + "wo.weight"], None)
        projections.append((wq, wkv, wo))
    return _with_attention(model, cfg, projections)
