"""Attention variants of a checkpoint: change how many K/V heads it has.

`variant` names: `native` (as stored), `mha` (n_kv_heads = n_heads), `gqa-N` (N K/V heads),
`mqa` (one). Going to fewer K/V heads mean-pools the K and V projection heads of each group
(Ainslie et al. 2023, "GQA", section 3.1); without uptraining this loses quality. Going to more
repeats each head (exact: the logits do not change). Every other tensor is shared, not copied.
"""
from __future__ import annotations

import torch
from torch import Tensor

from model.config import ModelConfig, valid_kv_heads


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
        if name.endswith(("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")):
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
