"""Model configuration: one frozen dataclass plus named presets.

The config is built once at the edge (loader, CLI, tests) and passed down. Derived values are
properties. The attention variant of a loaded checkpoint is expressed only through `n_kv_heads`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}; "
                f"valid choices: {', '.join(map(str, valid_kv_heads(self.n_heads)))}"
            )

    @property
    def group_size(self) -> int:
        """Query heads that share one K/V head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def variant(self) -> str:
        """The variant name of this config: `mha`, `gqa-N` or `mqa`."""
        if self.n_kv_heads == self.n_heads:
            return "mha"
        if self.n_kv_heads == 1:
            return "mqa"
        return f"gqa-{self.n_kv_heads}"

    def with_kv_heads(self, n_kv_heads: int) -> ModelConfig:
        return replace(self, n_kv_heads=n_kv_heads)


def valid_kv_heads(n_heads: int) -> list[int]:
    """Every K/V head count a model with `n_heads` query heads can use."""
    return [d for d in range(1, n_heads + 1) if n_heads % d == 0]


PRESETS: dict[str, ModelConfig] = {
    # A few layers of random weights: what most tests run on. Its vocab is the byte-level
    # tokenizer of `model.tokenizer.byte_tokenizer()` (3 specials + 256 bytes).
    "tiny": ModelConfig(
        vocab_size=259, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        rope_theta=10000.0, max_seq_len=512,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
        rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True,
    ),
}
