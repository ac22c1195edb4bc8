"""Attention variants of a checkpoint: change how many K/V heads it has.

`variant` names: `native` (as stored), `mha` (n_kv_heads = n_heads), `gqa-N` (N K/V heads),
`mqa` (one). Going to fewer K/V heads mean-pools the K and V projection heads of each group
(Ainslie et al. 2023, "GQA", section 3.1); without uptraining this loses quality. Going to more
repeats each head (exact: the logits do not change). Every other tensor is shared, not copied.

A variant can also come from a converted checkpoint directory (`kvserve convert` distils one that
keeps its quality): `with_converted_kv` takes its K/V projections and shares the rest with the
served model, after checking that the rest is the same.
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor

from model.config import ModelConfig, valid_kv_heads

KV_TENSORS = ("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")


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


def convert_state_dict(cfg: ModelConfig, state: dict[str, Tensor], n_kv_heads: int) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and tensors of the same checkpoint with `n_kv_heads` K/V heads.

    Converting between two counts where neither divides the other goes through MHA, which is
    exact in one direction and the mean-pool of the original groups in the other.
    """
    new_cfg = cfg.with_kv_heads(n_kv_heads)
    if n_kv_heads == cfg.n_kv_heads:
        return new_cfg, dict(state)
    out = {}
    for name, tensor in state.items():
        if name.endswith(KV_TENSORS):
            if n_kv_heads % cfg.n_kv_heads and cfg.n_kv_heads % n_kv_heads:
                tensor = _regroup_heads(tensor, cfg.n_kv_heads, cfg.n_heads)
                out[name] = _regroup_heads(tensor, cfg.n_heads, n_kv_heads)
            else:
                out[name] = _regroup_heads(tensor, cfg.n_kv_heads, n_kv_heads)
        else:
            out[name] = tensor
    return new_cfg, out


@torch.no_grad()
def with_variant(model, variant: str):
    """A model of `variant` built from `model`: shares every tensor the variant does not change."""
    from model.transformer import build_transformer

    cfg = model.config
    n_kv = parse_variant(variant, cfg.n_heads, cfg.n_kv_heads)
    new_cfg, state = convert_state_dict(cfg, dict(model.state_dict(keep_vars=False)), n_kv)
    return build_transformer(new_cfg, state, model.attention)


def split_variant(spec: str) -> tuple[str, str | None]:
    """`NAME=DIR` (a converted checkpoint served under NAME) -> (NAME, DIR); a variant name -> (name, None)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (spec, None)


def _is_kv(name: str) -> bool:
    return name.endswith(KV_TENSORS)


@torch.no_grad()
def with_converted_kv(model, path: str | Path, name: str):
    """`model` with the K/V projections of the checkpoint directory `path` (e.g. written by
    `kvserve convert`), sharing every other tensor with `model`.

    The directory must be the same network with another K/V head count and, but for its K/V
    projections, the same tensors (compared exactly in `model`'s dtype); a `name` that is a
    variant word (mha, mqa, gqa-N) must match its K/V head count. ValueError otherwise, naming
    the first difference.
    """
    from model.hf_loader import hf_tensor_name, open_hf
    from model.transformer import build_transformer

    checkpoint = open_hf(path)
    cfg, base_cfg = checkpoint.config, model.config
    if cfg.with_kv_heads(base_cfg.n_kv_heads) != base_cfg:
        diff = [f"{f.name}={getattr(cfg, f.name)} (served model: {getattr(base_cfg, f.name)})" for f in fields(cfg)
                if f.name != "n_kv_heads" and getattr(cfg, f.name) != getattr(base_cfg, f.name)]
        raise ValueError(f"variant {name}={path} is not a variant of the served model: {', '.join(diff)}")
    if re.fullmatch(r"mha|mqa|gqa-[0-9]+", name) and parse_variant(name, cfg.n_heads, base_cfg.n_kv_heads) != cfg.n_kv_heads:
        raise ValueError(f"variant {name}={path}: the checkpoint has {cfg.n_kv_heads} K/V heads, not what "
                         f"{name!r} means; name it after its head count or give it another name")
    theirs = checkpoint.state_dict(model.dtype, progress=False)
    ours = dict(model.state_dict())
    for tensor_name, tensor in theirs.items():
        if not _is_kv(tensor_name) and not torch.equal(tensor.to(model.device), ours[tensor_name]):
            raise ValueError(f"variant {name}={path}: tensor {hf_tensor_name(tensor_name)!r} differs from the served "
                             f"model's; only K/V projections may differ (serve it on its own: --model {path})")
    state = {n: theirs[n].to(model.device) if _is_kv(n) else t for n, t in ours.items()}
    return build_transformer(cfg, state, model.attention)
