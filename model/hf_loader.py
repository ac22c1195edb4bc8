"""Load a Hugging Face checkpoint directory: config.json, *.safetensors, tokenizer files.

Supports the Llama family as transformers names it: LlamaForCausalLM (also SmolLM),
MistralForCausalLM and Qwen2ForCausalLM (Q/K/V biases). Tensors come from one or more
safetensors files (a sharded checkpoint lists them in model.safetensors.index.json) and are
renamed to ours (model/transformer.py). Every failure a user can cause is one line naming the bad
thing: missing path or file, unsupported architecture, missing tensor, wrong tensor shape.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as BackendTokenizer
from torch import Tensor
from tqdm import tqdm

from model.config import ModelConfig
from model.tokenizer import HFTokenizer, bos_eos_post_processor

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

_LAYER_TENSORS = {  # ours -> Hugging Face, inside layer N
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_TOP_TENSORS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def hf_tensor_name(ours: str) -> str:
    """The Hugging Face name of one of our parameters."""
    if ours in _TOP_TENSORS:
        return _TOP_TENSORS[ours]
    _, layer, rest = ours.split(".", 2)  # layers.N.rest
    return f"model.layers.{layer}.{_LAYER_TENSORS[rest]}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def config_from_hf(cfg: dict, where: str) -> ModelConfig:
    """Our ModelConfig from a config.json dict; ValueError naming anything we cannot run."""
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch or cfg.get('model_type')!r} in {where}: "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[arch]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} in {where}: supported: silu")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"unsupported attention_bias/mlp_bias in {where}: only Qwen2's Q/K/V biases are supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 / 4 spelling
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported rope type {rope_type!r} in {where}: only plain rotary embeddings (default)")
    n_heads = cfg["num_attention_heads"]
    dim = cfg["hidden_size"]
    max_seq_len = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")
    if window and (family == "mistral" or cfg.get("use_sliding_window")):
        max_seq_len = min(max_seq_len, window)  # within the window, sliding attention is full attention
    return ModelConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=cfg.get("head_dim") or dim // n_heads,
        ffn_dim=cfg["intermediate_size"], rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), max_seq_len=max_seq_len,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2",
    )


def _special_token_text(value) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        return value.get("content")
    return value


def _eos_ids(*values) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, int):
            out.append(value)
        elif isinstance(value, list):
            out.extend(v for v in value if isinstance(v, int))
    return out


@dataclass(slots=True)
class HFCheckpoint:
    """A checkpoint directory with its config read; tensors are read by `weights`."""

    path: Path
    hf_config: dict
    config: ModelConfig

    def _tensor_files(self) -> dict[str, Path]:
        """Hugging Face tensor name -> the safetensors file that holds it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.path}")
        where = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
        return where

    def weights(self, dtype: torch.dtype = torch.float32, *, progress: bool = True) -> dict[str, Tensor]:
        """Our tensors in `dtype`, checked for presence and shape against the config."""
        from model.transformer import checkpoint_shapes

        expected = checkpoint_shapes(self.config)
        files = self._tensor_files()
        wanted: dict[Path, list[str]] = {}
        for ours in expected:
            hf_name = hf_tensor_name(ours)
            if hf_name not in files:
                raise ValueError(f"missing tensor {hf_name!r} in {self.path} (expected shape {expected[ours]})")
            wanted.setdefault(files[hf_name], []).append(ours)
        state = {}
        bar = tqdm(total=len(expected), desc=f"loading {self.path.name}", unit="tensor", file=sys.stderr,
                   disable=not progress, leave=False)
        with bar:
            for file, names in wanted.items():
                if not file.is_file():
                    raise FileNotFoundError(f"missing shard {file.name} listed in {self.path}/model.safetensors.index.json")
                with safe_open(file, framework="pt") as f:
                    for ours in names:
                        tensor = f.get_tensor(hf_tensor_name(ours))
                        if tuple(tensor.shape) != expected[ours]:
                            raise ValueError(f"tensor {hf_tensor_name(ours)!r} in {file.name} has shape "
                                             f"{tuple(tensor.shape)}, expected {expected[ours]}")
                        state[ours] = tensor.to(dtype)
                        bar.update()
        return state

    def tokenizer(self) -> HFTokenizer:
        """tokenizer.json with tokenizer_config.json's special tokens and chat template."""
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"missing tokenizer.json in {self.path}")
        backend = BackendTokenizer.from_file(str(tok_file))
        conf_file = self.path / "tokenizer_config.json"
        tok_cfg = _read_json(conf_file) if conf_file.is_file() else {}
        gen_file = self.path / "generation_config.json"
        gen_cfg = _read_json(gen_file) if gen_file.is_file() else {}

        texts = {name: _special_token_text(tok_cfg.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special: dict[str, str] = {name: text for name, text in texts.items() if text is not None}
        eos_ids = _eos_ids(gen_cfg.get("eos_token_id"), self.hf_config.get("eos_token_id"))
        if "eos_token" not in special and eos_ids and (text := backend.id_to_token(eos_ids[0])) is not None:
            special["eos_token"] = text
        if "eos_token" not in special:
            raise ValueError(f"no eos_token in {self.path}: set it in tokenizer_config.json or generation_config.json")

        # tokenizer.json's own post-processor says what encode adds; only without one do the flags.
        if backend.post_processor is None:
            bos, eos = special.get("bos_token"), special["eos_token"]
            backend.post_processor = bos_eos_post_processor(
                bos if tok_cfg.get("add_bos_token") else None, backend.token_to_id(bos) if bos else None,
                eos if tok_cfg.get("add_eos_token") else None, backend.token_to_id(eos) if eos else None)
        return HFTokenizer(backend, special_tokens=special, chat_template=self._chat_template(tok_cfg),
                         extra_eos_token_ids=eos_ids)

    def _chat_template(self, tok_cfg: dict) -> str | None:
        jinja_file = self.path / "chat_template.jinja"  # where transformers >= 4.43 saves it
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one is the chat template
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template


def open_hf(path: str | Path) -> HFCheckpoint:
    """Open a Hugging Face checkpoint directory and read its config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"missing config.json in {path}")
    hf_config = _read_json(cfg_file)
    try:
        config = config_from_hf(hf_config, str(cfg_file))
    except KeyError as exc:
        raise ValueError(f"{cfg_file} lacks required key {exc.args[0]!r}") from None
    return HFCheckpoint(path, hf_config, config)
