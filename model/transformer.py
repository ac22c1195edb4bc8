"""The network: a Llama-family decoder in one flat file (RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA).

Two forwards share every layer:
- `forward(input_ids[B, T])` with no cache: the reference path (tests, perplexity, `generate`).
- `forward(input_ids[N], kv_cache=..., meta=...)`: a flat ragged batch of new tokens from several
  sequences; each layer writes its K/V into the paged cache and attends over the pages. The cache
  metadata is an explicit argument, never a global.
Weights are named after Meta's Llama (wq/wk/wv/wo, w1 gate, w2 down, w3 up); loaders map to them.
Rotary embedding uses the "rotate half" layout of Hugging Face checkpoints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import get_attention
from model.config import ModelConfig
from model.paged_attention import PAGED_ATTENTION_IMPLS, write_kv

if TYPE_CHECKING:
    from kvcache.kv_cache import KVCache
    from kvcache.metadata import PagedMetadata


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_seq_len, head_dim), float32, "rotate half" layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, H, D); cos/sin (..., T, 1, D) already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., T, dim) -> q (..., T, Hq, D), k and v (..., T, Hkv, D), rotary applied."""
        lead = x.shape[:-1]
        q = self.wq(x).view(*lead, self.n_heads, self.head_dim)
        k = self.wk(x).view(*lead, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(*lead, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_name: str) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)  # (B, T, H, D)
        out = get_attention(attn_name)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def forward_paged(self, x: Tensor, cos: Tensor, sin: Tensor, attn_name: str,
                      k_cache: Tensor, v_cache: Tensor, meta: PagedMetadata) -> Tensor:
        q, k, v = self._qkv(x, cos, sin)  # (N, H, D)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = PAGED_ATTENTION_IMPLS[attn_name](q, k_cache, v_cache, meta)
        return self.wo(out.reshape(x.shape[0], -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: str = "flash"):
        super().__init__()
        get_attention(attention)  # fail early on a bad name
        self.config = cfg
        self.attention = attention
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    @property
    def blocks(self) -> list[Block]:
        """The decoder layers, typed (nn.ModuleList yields plain Modules)."""
        return cast(list[Block], list(self.layers))

    def set_attention(self, name: str) -> None:
        get_attention(name)
        self.attention = name

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def _apply(self, fn, recurse=True):  # keep the float32 rope tables on the weights' device
        super()._apply(fn, recurse)
        if self.rope_cos.device != self.device:
            self.rope_cos, self.rope_sin = self.rope_cos.to(self.device), self.rope_sin.to(self.device)
        return self

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} beyond max_seq_len={self.config.max_seq_len}")
        cos = self.rope_cos[positions].to(self.dtype).unsqueeze(-2)  # (..., T, 1, D)
        sin = self.rope_sin[positions].to(self.dtype).unsqueeze(-2)
        return cos, sin

    def _logits(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def forward(self, input_ids: Tensor, kv_cache: KVCache | None = None, meta: PagedMetadata | None = None,
                logits_indices: Tensor | None = None) -> Tensor:
        """No cache: input_ids (B, T) -> logits (B, T, vocab).

        Paged: input_ids (N,) flat new tokens, with `kv_cache` and `meta` -> logits (N, vocab), or
        only the rows in `logits_indices` (e.g. each sequence's last token) when given.
        """
        if kv_cache is None:
            return self._forward_dense(input_ids)
        if meta is None:
            raise ValueError("a paged forward needs its PagedMetadata")
        cos, sin = self._rope(meta.positions)
        h = self.tok_embeddings(input_ids)  # (N, dim)
        for i, layer in enumerate(self.blocks):
            h = h + layer.attention.forward_paged(layer.attention_norm(h), cos, sin, self.attention,
                                                  kv_cache.k[i], kv_cache.v[i], meta)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        if logits_indices is not None:
            h = h[logits_indices]
        return self._logits(h)

    def _forward_dense(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        cos, sin = self._rope(torch.arange(T, device=input_ids.device))
        h = self.tok_embeddings(input_ids)  # (B, T, dim)
        for layer in self.blocks:
            h = h + layer.attention(layer.attention_norm(h), cos, sin, self.attention)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self._logits(h)


def build_transformer(cfg: ModelConfig, state_dict: dict[str, Tensor], attention: str = "flash") -> Transformer:
    """A Transformer that uses the given tensors as its parameters (shared, not copied).

    Every parameter must be present with its exact shape; the error names the first that is not.
    """
    with torch.device("meta"):
        model = Transformer(cfg, attention)
    expected = {name: p.shape for name, p in model.named_parameters()}
    for name, shape in expected.items():
        if name not in state_dict:
            raise ValueError(f"missing tensor {name!r} (expected shape {tuple(shape)})")
        if tuple(state_dict[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(state_dict[name].shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected tensors: {', '.join(unexpected[:5])}")
    model.load_state_dict(state_dict, assign=True)
    device = next(iter(state_dict.values())).device
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
    return model.eval().requires_grad_(False)


def random_transformer(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       attention: str = "flash") -> Transformer:
    """Random weights (unit-variance activations, norms near 1): what the tests' tiny models are."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(cfg, attention).named_parameters()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias") or name == "tok_embeddings.weight":
            state[name] = torch.randn(shape, generator=gen) * (0.1 if name.endswith("bias") else 1.0)
        else:
            state[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return build_transformer(cfg, {k: v.to(dtype) for k, v in state.items()}, attention)
