"""Load a llama.cpp GGUF checkpoint: config, tensors under our names, tokenizer.

Read with the `gguf` package (GGUFReader). Q4_1 and Q8_0 tensors stay quantized (their blocks
become model.quantized.Q4Weight / Q8Weight, codes as stored); every other type is dequantized with
`gguf.quants.dequantize` to float32. Only the `llama` architecture (Llama, SmolLM,
Mistral-as-llama) with a byte-level BPE ("gpt2") vocabulary is supported; anything else fails
with a one-line error.

llama.cpp's converter permutes the rows of attn_q / attn_k (and their biases) so that its rotary
kernel can rotate interleaved pairs; our network, like Hugging Face's, rotates halves. The
permutation is undone per head exactly as transformers' GGUF loader does
(`LlamaTensorProcessor._reverse_permute_weights`); for quantized tensors it moves whole rows
(codes and scales together), so it is exact there too.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, pre_tokenizers
from torch import Tensor
from tqdm import tqdm

from model.config import ModelConfig
from model.quantized import WeightT, permute_weight_rows, q4_from_gguf, q8_from_gguf
from model.tokenizer import HFTokenizer, bos_eos_post_processor, byte_level_bpe, bytes_to_unicode

SUPPORTED_ARCHITECTURES = ("llama",)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex; None: GPT-2's own regex inside ByteLevel. transformers builds
# "smollm" (and every type it has no entry for) as a plain GPT-2 tokenizer, so we do too.
_PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
}

_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4

# GGUF tensor name (layer part replaced by N) -> ours.
_TENSOR_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.N.attn_norm.weight": "layers.N.attention_norm.weight",
    "blk.N.attn_q.weight": "layers.N.attention.wq.weight",
    "blk.N.attn_k.weight": "layers.N.attention.wk.weight",
    "blk.N.attn_v.weight": "layers.N.attention.wv.weight",
    "blk.N.attn_q.bias": "layers.N.attention.wq.bias",
    "blk.N.attn_k.bias": "layers.N.attention.wk.bias",
    "blk.N.attn_v.bias": "layers.N.attention.wv.bias",
    "blk.N.attn_output.weight": "layers.N.attention.wo.weight",
    "blk.N.ffn_norm.weight": "layers.N.ffn_norm.weight",
    "blk.N.ffn_gate.weight": "layers.N.feed_forward.w1.weight",
    "blk.N.ffn_down.weight": "layers.N.feed_forward.w2.weight",
    "blk.N.ffn_up.weight": "layers.N.feed_forward.w3.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")
_MISSING = object()


def rotary_row_order(rows: int, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved rotary pairs -> two halves.
    Returns, for each row in Hugging Face order, the GGUF row it comes from."""
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(rows)


def our_tensor_name(gguf_name: str) -> str:
    """Our parameter name for a GGUF tensor name; ValueError for a tensor we have no place for."""
    match = _LAYER.match(gguf_name)
    key = _LAYER.sub("blk.N.", gguf_name) if match else gguf_name
    if key not in _TENSOR_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF: not part of a Llama-family model")
    return _TENSOR_NAMES[key].replace("N", match.group(1)) if match else _TENSOR_NAMES[key]


@dataclass(slots=True)
class GGUFCheckpoint:
    """An opened GGUF file: metadata and config are read, tensors not yet dequantized."""

    path: Path
    reader: GGUFReader
    config: ModelConfig

    def field(self, key: str, default=_MISSING):
        return _read_field(self.reader, self.path, key, default)

    def weights(self, *, progress: bool = True) -> dict[str, WeightT]:
        """Every tensor under our names, Q/K rows in rotate-half order: Q4_1 / Q8_0 as their codes,
        the rest dequantized to float32."""
        cfg = self.config
        out: dict[str, WeightT] = {}
        for tensor in tqdm(self.reader.tensors, desc=f"reading {self.path.name}", unit="tensor",
                           file=sys.stderr, disable=not progress, leave=False):
            name = our_tensor_name(tensor.name)
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
            weight: WeightT
            if tensor.tensor_type == GGMLQuantizationType.Q4_1 and len(shape) == 2:
                weight = q4_from_gguf(tensor.data, *shape)
            elif tensor.tensor_type == GGMLQuantizationType.Q8_0 and len(shape) == 2:
                weight = q8_from_gguf(tensor.data, *shape)
            else:  # (rows, cols) float32, numpy order
                weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
            if ".attn_q." in tensor.name:
                weight = permute_weight_rows(weight, rotary_row_order(shape[0], cfg.n_heads))
            elif ".attn_k." in tensor.name:
                weight = permute_weight_rows(weight, rotary_row_order(shape[0], cfg.n_kv_heads))
            out[name] = weight
        return out

    def tokenizer(self) -> HFTokenizer:
        """The tokenizer described by the tokenizer.ggml.* metadata, with the file's chat template."""
        model = self.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} in {self.path.name}: supported: gpt2 (byte-level BPE)")
        pre = self.field("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZER_SPLITS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} in {self.path.name}: "
                             f"supported: {', '.join(sorted(_PRE_TOKENIZER_SPLITS))}")
        tokens: list[str] = self.field("tokenizer.ggml.tokens")
        token_types: list[int] = self.field("tokenizer.ggml.token_type", [1] * len(tokens))
        alphabet = set(bytes_to_unicode().values())
        spelling = bytes_to_unicode()
        # A token written with characters outside the byte alphabet (rare) is respelled byte by byte.
        vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
                 for i, tok in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in self.field("tokenizer.ggml.merges", [])]
        # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would
        # grow the vocabulary past the model's (transformers skips them too).
        control = [tok for tok, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_CONTROL and set(tok) <= alphabet]
        split = _PRE_TOKENIZER_SPLITS[pre]
        pre_tokenizer = None if split is None else pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend = byte_level_bpe(vocab, merges, control, pre_tokenizer)
        user_defined = [AddedToken(tok, normalized=False, special=False)
                        for tok, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_USER_DEFINED]
        if user_defined:
            backend.add_tokens(user_defined)

        special = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            token_id = self.field(f"tokenizer.ggml.{key}", None)
            if token_id is not None:
                special[name] = tokens[token_id]
        if "eos_token" not in special:
            raise ValueError(f"GGUF {self.path.name} has no tokenizer.ggml.eos_token_id")
        add_bos = self.field("tokenizer.ggml.add_bos_token", False) and "bos_token" in special
        add_eos = self.field("tokenizer.ggml.add_eos_token", False)
        backend.post_processor = bos_eos_post_processor(
            special.get("bos_token") if add_bos else None, backend.token_to_id(special.get("bos_token", "")),
            special["eos_token"] if add_eos else None, backend.token_to_id(special["eos_token"]))
        return HFTokenizer(backend, special_tokens=special,
                         chat_template=self.field("tokenizer.chat_template", None))


def _read_field(reader: GGUFReader, path: Path, key: str, default=_MISSING):
    """A metadata value; `default` when absent, or a one-line error when there is none."""
    if key in reader.fields:
        return reader.fields[key].contents()
    if default is _MISSING:
        raise ValueError(f"GGUF {path.name} lacks metadata key {key!r}")
    return default


def _config_from_metadata(path: Path, reader: GGUFReader) -> ModelConfig:
    def get(key: str, default=_MISSING):
        return _read_field(reader, path, key, default)

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in {path.name}: supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"unsupported rope scaling in {path.name}: only plain rotary embeddings are supported")
    n_heads = get(f"{arch}.attention.head_count")
    n_kv_heads = get(f"{arch}.attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv_heads, list):
        raise ValueError(f"per-layer head counts in {path.name} are not supported")
    dim = get(f"{arch}.embedding_length")
    vocab_size = get(f"{arch}.vocab_size", None)
    if vocab_size is None:
        vocab_size = len(get("tokenizer.ggml.tokens"))
    head_dim = get(f"{arch}.attention.key_length", None) or get(f"{arch}.rope.dimension_count", None) or dim // n_heads
    return ModelConfig(
        vocab_size=vocab_size, dim=dim, n_layers=get(f"{arch}.block_count"), n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=get(f"{arch}.feed_forward_length"),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=get(f"{arch}.context_length", 2048),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
    )


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF and read its config; a clear one-line error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except ValueError as exc:
        raise ValueError(f"not a readable GGUF file: {path} ({exc})") from None
    return GGUFCheckpoint(path, reader, _config_from_metadata(path, reader))
