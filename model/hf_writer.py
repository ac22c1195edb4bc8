"""Write a model and its tokenizer as a Hugging Face checkpoint directory.

The directory holds what `model.hf_loader` and transformers' `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained` read: config.json, model.safetensors (transformers' tensor names;
no lm_head with tied embeddings), tokenizer.json, tokenizer_config.json (special tokens and the
chat template) and generation_config.json (BOS and every end-of-generation token id). A source
checkpoint's own config.json, when there is one, is kept with only the changed fields replaced.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from model.config import ModelConfig
from model.hf_loader import hf_tensor_name
from model.quantized import dequantize
from model.tokenizer import HFTokenizer
from model.transformer import Transformer, checkpoint_weights


def hf_config(cfg: ModelConfig, tokenizer: HFTokenizer, dtype: torch.dtype, base: dict | None = None) -> dict:
    """config.json's content for `cfg`: `base` (a source checkpoint's config) updated, or built anew."""
    architecture = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    out = dict(base) if base else {"architectures": [architecture], "model_type": architecture[:-len("ForCausalLM")].lower(),
                                   "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    out.update({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    })
    if not base:
        out.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    return out


def tokenizer_config(tokenizer: HFTokenizer, max_len: int) -> dict:
    """tokenizer_config.json: a fast tokenizer over tokenizer.json, its special tokens and chat template."""
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                 "clean_up_tokenization_spaces": False, **tokenizer.special_tokens}
    if tokenizer.chat_template is not None:
        out["chat_template"] = tokenizer.chat_template
    return out


def save_tokenizer_files(tokenizer: HFTokenizer, cfg: ModelConfig, path: str | Path) -> list[str]:
    """Only the tokenizer of a checkpoint, as client tools read it from a folder (transformers'
    AutoTokenizer, guidellm, lm-evaluation-harness): tokenizer.json, tokenizer_config.json (special
    tokens, chat template), config.json and generation_config.json. `path` may exist; returns the
    names written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": hf_config(cfg, tokenizer, torch.bfloat16),
        "tokenizer_config.json": tokenizer_config(tokenizer, cfg.max_seq_len),
        "generation_config.json": {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": sorted(tokenizer.eos_token_ids)},
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    (path / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True), encoding="utf-8")
    return ["tokenizer.json", *files]


def save_hf_checkpoint(model: Transformer, tokenizer: HFTokenizer, path: str | Path, *, base_config: dict | None = None,
                       extra_files: dict[str, str] | None = None) -> None:
    """Write `model` and `tokenizer` into the new directory `path` (it must not exist).

    `extra_files` maps more file names to their text (e.g. a record of how the model was made).
    """
    path = Path(path)
    path.mkdir(parents=True)
    cfg = model.config
    # copies: the parts of a fused projection are views of one tensor, which safetensors refuses
    tensors = {hf_tensor_name(name): dequantize(w).to(model.dtype) if not isinstance(w, Tensor) else w.detach().clone()
               for name, w in checkpoint_weights(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    files = {
        "config.json": hf_config(cfg, tokenizer, model.dtype, base_config),
        "tokenizer_config.json": tokenizer_config(tokenizer, cfg.max_seq_len),
        "generation_config.json": {"bos_token_id": tokenizer.bos_token_id,
                                   "eos_token_id": sorted(tokenizer.eos_token_ids)},
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    (path / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text, encoding="utf-8")
