"""The network: a Llama-family decoder in one flat file (RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA).

Two forwards share every layer:
- `forward(input_ids[B, T])` with no cache: the reference path (tests, perplexity, `generate`).
- `forward(input_ids[N], kv_cache=..., meta=...)`: a flat ragged batch of new tokens from several
  sequences; the step is planned once (model/paged_plan.py: indices, masks, rotary rows) and each
  layer writes its K/V into the paged cache and attends over the pages. The cache metadata is an
  explicit argument, never a global.
Checkpoint tensors are named after Meta's Llama (wq/wk/wv/wo, w1 gate, w2 down, w3 up; see
`checkpoint_shapes`); the network fuses K with V and gate with up (`wkv`, `w13`: one matmul
each), and keeps Q apart (`wq`), so an attention variant changes exactly one module per layer
(`wkv`) and shares the rest. Each projection is a `model.linear.Linear` whose weight forms
`--quantization` picks (model/quantization.py); `checkpoint_weights` gives a built model's
tensors back under the checkpoint's names. Rotary embedding uses the "rotate half" layout of Hugging Face checkpoints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import kernels
from model.attention import get_attention
from model.config import ModelConfig
from model.linear import Embedding, Linear
from model.paged_attention import PAGED_ATTENTION_IMPLS, write_kv
from model.paged_plan import DEFAULT_DECODE_TILE_TOKENS, PagedPlan
from model.quantized import WeightT, weight_rows
from model.weight_forms import DenseForm

if TYPE_CHECKING:
    from kvcache.kv_cache import KVCache
    from kvcache.metadata import PagedMetadata

# Decode key tile per paged attention: flash tiles long contexts; the references take each whole.
DECODE_TILE_TOKENS: dict[str, int | None] = {"flash": DEFAULT_DECODE_TILE_TOKENS, "sdpa": None, "naive": None,
                                              "kernel": None}


class RMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float, kernel: bool = False):
        """kernel: run kvserve's one-op CPU kernel (model/kernels/rms_norm.cpp) when no gradient is wanted."""
        super().__init__()
        if kernel and not kernels.available():  # loads the library on first use
            raise RuntimeError(f"RMSNorm kernel: {kernels.unavailable_reason()}")
        self.eps, self.kernel = eps, kernel
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return torch.ops.kvserve.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and signed sin of shape (max_seq_len, head_dim), float32, "rotate half" layout: the
    sin's first half is negated, so rotating is x * cos + roll(x, D/2) * sin (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs, freqs), dim=-1).sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, H, D); cos / signed sin (..., T, 1, D). Rotate half: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, wq: Linear, wkv: Linear, wo: Linear):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq, self.wkv, self.wo = wq, wkv, wo  # wkv: 2 Hkv * D rows, K then V

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., T, dim) -> q (..., T, Hq, D), k and v (..., T, Hkv, D), rotary applied to q and k."""
        Hkv, D = self.n_kv_heads, self.head_dim
        q = self.wq(x).view(*x.shape[:-1], self.n_heads, D)
        kv = self.wkv(x).view(*x.shape[:-1], 2 * Hkv, D)
        return apply_rope(q, cos, sin), apply_rope(kv[..., :Hkv, :], cos, sin), kv[..., Hkv:, :]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_name: str) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)  # (B, T, H, D)
        v = v.to(q.dtype)
        out = get_attention(attn_name)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def forward_paged(self, x: Tensor, plan: PagedPlan, attn_name: str, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        q, k, v = self._qkv(x, plan.cos, plan.sin)  # (N, H, D)
        write_kv(k_cache, v_cache, k, v, plan)
        out = PAGED_ATTENTION_IMPLS[attn_name](q, k_cache, v_cache, plan)
        return self.wo(out.reshape(x.shape[0], -1))


class FeedForward(nn.Module):
    def __init__(self, w13: Linear, w2: Linear):
        super().__init__()
        self.w13, self.w2 = w13, w2  # gate rows, then up rows; down
        self.ffn_dim = w2.in_features

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, attention_norm: RMSNorm, attention: Attention, ffn_norm: RMSNorm, feed_forward: FeedForward):
        super().__init__()
        self.attention_norm, self.attention = attention_norm, attention
        self.ffn_norm, self.feed_forward = ffn_norm, feed_forward


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, embedding: Embedding, layers: list[Block], norm: RMSNorm,
                 output: Linear, attention: str = "flash", weights: str = "dense"):
        super().__init__()
        get_attention(attention)  # fail early on a bad name
        self.config = cfg
        self.attention = attention
        self.tok_embeddings = embedding
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = output  # the LM head; for tied embeddings built from the embedding's weight
        self.weights = weights  # which weight forms run, in words (model/quantization.py)
        self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=embedding.device)

    @property
    def blocks(self) -> list[Block]:
        """The decoder layers, typed (nn.ModuleList yields plain Modules)."""
        return cast(list[Block], list(self.layers))

    def set_attention(self, name: str) -> None:
        get_attention(name)
        self.attention = name

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.dtype

    def linears(self) -> list[Linear]:
        """Every projection of the body (not the LM head), layer by layer."""
        return [m for layer in self.blocks for m in (layer.attention.wq, layer.attention.wkv, layer.attention.wo,
                                                      layer.feed_forward.w13, layer.feed_forward.w2)]

    def _rope(self, positions: Tensor, max_position: int) -> tuple[Tensor, Tensor]:
        if max_position >= self.config.max_seq_len:
            raise ValueError(f"position {max_position} beyond max_seq_len={self.config.max_seq_len}")
        cos = self.rope_cos[positions].to(self.dtype).unsqueeze(-2)  # (..., T, 1, D)
        sin = self.rope_sin[positions].to(self.dtype).unsqueeze(-2)
        return cos, sin

    def _logits(self, h: Tensor) -> Tensor:
        return self.output(self.norm(h))

    def plan(self, meta: PagedMetadata, attention: str | None = None) -> PagedPlan:
        """Everything the layers need from the step's batch, built once for all of them, for the
        paged form `attention` (default: the model's)."""
        cfg, attention = self.config, attention or self.attention
        return PagedPlan.build(meta, n_kv_heads=cfg.n_kv_heads, group=cfg.group_size, dtype=self.dtype,
                               rope=(self.rope_cos, self.rope_sin), decode_tile_tokens=DECODE_TILE_TOKENS[attention],
                               value_rows=attention == "flash",  # only flash reads V rows in place
                               kernel=attention == "kernel")

    def forward(self, input_ids: Tensor, kv_cache: KVCache | None = None, meta: PagedMetadata | None = None,
                logits_indices: Tensor | None = None, attention: str | None = None) -> Tensor:
        """No cache: input_ids (B, T) -> logits (B, T, vocab).

        Paged: input_ids (N,) flat new tokens, with `kv_cache` and `meta` -> logits (N, vocab), or
        only the rows in `logits_indices` (e.g. each sequence's last token) when given; `attention`
        runs this step in another paged form than the model's (flash, sdpa, naive: all exact).
        """
        if kv_cache is None:
            return self._forward_dense(input_ids)
        h = self.hidden_paged(input_ids, kv_cache, meta, attention)
        if logits_indices is not None:
            h = h[logits_indices]
        return self._logits(h)

    def hidden_paged(self, input_ids: Tensor, kv_cache: KVCache, meta: PagedMetadata | None,
                     attention: str | None = None) -> Tensor:
        """The paged forward up to the last layer's output, (N, dim): `logits(h[rows])` gives any
        rows' logits, each set of rows its own LM-head call (so its kernel depends on its own rows)."""
        if meta is None:
            raise ValueError("a paged forward needs its PagedMetadata")
        attention = attention or self.attention
        plan = self.plan(meta, attention)
        h = self.tok_embeddings(input_ids)  # (N, dim)
        for i, layer in enumerate(self.blocks):
            h += layer.attention.forward_paged(layer.attention_norm(h), plan, attention, kv_cache.k[i], kv_cache.v[i])
            h += layer.feed_forward(layer.ffn_norm(h))
        return h

    def logits(self, h: Tensor) -> Tensor:
        """Logits of hidden states from `hidden_paged` (final norm, LM head)."""
        return self._logits(h)

    def _forward_dense(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        cos, sin = self._rope(torch.arange(T, device=input_ids.device), T - 1)
        h = self.tok_embeddings(input_ids)  # (B, T, dim)
        for layer in self.blocks:
            h = h + layer.attention(layer.attention_norm(h), cos, sin, self.attention)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self._logits(h)


def checkpoint_weights(model: Transformer) -> dict[str, WeightT]:
    """The model's tensors under the checkpoint's (Llama) names, as its weight forms hold them
    (dense in the model's dtype, or quantized codes): fused projections are cut back into their
    parts, as views of the fused weight. The inverse of `build_transformer`."""
    cfg = model.config
    kv, ffn = cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    out: dict[str, WeightT] = {"tok_embeddings.weight": model.tok_embeddings.weight, "norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.output.source
    for i, layer in enumerate(model.blocks):
        p, attn, mlp = f"layers.{i}.", layer.attention, layer.feed_forward
        out |= {p + "attention_norm.weight": layer.attention_norm.weight, p + "ffn_norm.weight": layer.ffn_norm.weight,
                p + "attention.wq.weight": attn.wq.source, p + "attention.wo.weight": attn.wo.source,
                p + "attention.wk.weight": weight_rows(attn.wkv.source, 0, kv),
                p + "attention.wv.weight": weight_rows(attn.wkv.source, kv, 2 * kv),
                p + "feed_forward.w1.weight": weight_rows(mlp.w13.source, 0, ffn),
                p + "feed_forward.w3.weight": weight_rows(mlp.w13.source, ffn, 2 * ffn),
                p + "feed_forward.w2.weight": mlp.w2.source}
        if cfg.qkv_bias:
            assert attn.wq.bias is not None and attn.wkv.bias is not None
            out |= {p + "attention.wq.bias": attn.wq.bias, p + "attention.wk.bias": attn.wkv.bias[:kv],
                    p + "attention.wv.bias": attn.wkv.bias[kv:]}
    return out


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint gives the network, by our (Llama) name, with its shape, in the
    network's order (which `random_weights` draws them in)."""
    D, q_rows, kv_rows = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, D)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (D,)
        for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
            shapes[p + f"attention.{name}.weight"] = (rows, D)
            if cfg.qkv_bias:
                shapes[p + f"attention.{name}.bias"] = (rows,)
        shapes |= {p + "attention.wo.weight": (D, q_rows), p + "ffn_norm.weight": (D,),
                   p + "feed_forward.w1.weight": (cfg.ffn_dim, D), p + "feed_forward.w2.weight": (D, cfg.ffn_dim),
                   p + "feed_forward.w3.weight": (cfg.ffn_dim, D)}
    shapes["norm.weight"] = (D,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, D)
    return shapes


def check_weights(cfg: ModelConfig, weights: dict[str, WeightT]) -> None:
    """Every tensor present with its exact shape, nothing extra; the error names the first that is not."""
    expected = checkpoint_shapes(cfg)
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"missing tensor {name!r} (expected shape {shape})")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected tensors: {', '.join(unexpected[:5])}")


def build_transformer(cfg: ModelConfig, weights: dict[str, WeightT], *, attention: str = "flash",
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      quantization: str = "none", crossover: int | None = None) -> Transformer:
    """A Transformer running `weights` (dense tensors or model.quantized weights) as
    `quantization` says (model/quantization.py; `crossover` pins auto's batch size where the
    quantized forms hand over). Dense tensors already in `dtype` on `device` are shared where a
    form uses them as they are."""
    from model.quantization import resolve_policy

    check_weights(cfg, weights)
    policy = resolve_policy(quantization, device, dtype, weights, crossover)
    fast_norms = policy.small == "kernel"  # kvserve's kernels are loaded: the norms run there too

    def dense(name: str) -> Tensor:
        w = weights[name]
        assert isinstance(w, Tensor), name
        return w.to(device, dtype)

    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        q_bias = kv_bias = None
        if cfg.qkv_bias:
            q_bias = dense(p + "attention.wq.bias")
            kv_bias = torch.cat([dense(p + f"attention.w{x}.bias") for x in "kv"])
        wq = policy.linear([weights[p + "attention.wq.weight"]], dtype, bias=q_bias)
        wkv = policy.linear([weights[p + f"attention.w{x}.weight"] for x in "kv"], dtype, bias=kv_bias)
        wo = policy.linear([weights[p + "attention.wo.weight"]], dtype)
        w13 = policy.linear([weights[p + "feed_forward.w1.weight"], weights[p + "feed_forward.w3.weight"]], dtype)
        w2 = policy.linear([weights[p + "feed_forward.w2.weight"]], dtype)
        layers.append(Block(RMSNorm(dense(p + "attention_norm.weight"), cfg.norm_eps, fast_norms), Attention(cfg, wq, wkv, wo),
                            RMSNorm(dense(p + "ffn_norm.weight"), cfg.norm_eps, fast_norms), FeedForward(w13, w2)))
    embedding = policy.embedding(weights["tok_embeddings.weight"], dtype)
    head = weights["tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"]
    output = policy.linear([head], dtype, head=True)
    if cfg.tie_embeddings and isinstance(output.small, DenseForm) and output.large is output.small \
            and isinstance(embedding.weight, Tensor) and output.small.weight.dtype == embedding.weight.dtype:
        output.small.weight = output.small.source = output.weight = embedding.weight  # one parameter: the tie
    model = Transformer(cfg, embedding=embedding, layers=layers, norm=RMSNorm(dense("norm.weight"), cfg.norm_eps, fast_norms),
                        output=output, attention=attention)
    model.weights = policy.set_crossovers(model.linears(), model.output)
    return model.eval().requires_grad_(False)


def random_transformer(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       attention: str = "flash", quantization: str = "none") -> Transformer:
    """A model of random weights: what the tests' tiny models are."""
    return build_transformer(cfg, random_weights(cfg, seed=seed), attention=attention, dtype=dtype,
                             quantization=quantization)


def random_weights(cfg: ModelConfig, *, seed: int = 0) -> dict[str, WeightT]:
    """Random float32 checkpoint tensors (unit-variance activations, norms near 1)."""
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, WeightT] = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias") or name == "tok_embeddings.weight":
            weights[name] = torch.randn(shape, generator=gen) * (0.1 if name.endswith("bias") else 1.0)
        else:
            weights[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return weights
