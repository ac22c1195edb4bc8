"""--quantization on tiny random models: what each option resolves to, quantized models against
their dequantized twins, the row count that picks the form, variants of quantized models.

The dequantized twin is built independently: the checkpoint's weights quantized here, then
dequantized and loaded as dense float32. A quantized model differs from it only by what its
kernels round (bfloat16 activations for q4 / int8), so a fused projection in the wrong order, a
wrong group mapping or a lost bias would show as an error orders of magnitude larger.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvcache.kv_cache import KVCache
from kvcache.metadata import PagedMetadata
from model.config import PRESETS
from model.loader import load_model
from model.quantization import parse_quantization, resolve_policy
from model.quantized import dequantize, quantize_int8_rows, quantize_q4
from model.transformer import build_transformer, random_weights
from model.variants import with_variant
from model.weight_forms import kernel_available
from tests.model.kernel_support import require_kernels

pytestmark = pytest.mark.skipif(not all(kernel_available(k, "cpu") for k in ("q4", "int8", "fp16")),
                                reason="this torch build lacks a CPU weight-only kernel")

TINY = replace(PRESETS["tiny"], qkv_bias=True)  # biases too: the fused QKV carries them
LINEAR = ("attention.w", "feed_forward.w", "output.weight")


def quantized_checkpoint(cfg, kind: str, seed: int = 0) -> dict:
    """Random weights with every projection stored quantized (as a GGUF would hold them)."""
    weights = random_weights(cfg, seed=seed)
    quantize = {"q4": quantize_q4, "int8": quantize_int8_rows}[kind]
    return {name: quantize(w) if w.dim() == 2 and any(p in name for p in LINEAR) else w for name, w in weights.items()}


def dequantized(weights: dict) -> dict:
    return {name: dequantize(w) for name, w in weights.items()}


def ids(n: int = 23, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_parse_quantization_names_the_choices():
    assert parse_quantization("q4") == "q4"
    with pytest.raises(ValueError, match=r"invalid quantization 'int4': use one of auto, tuned, none, q4, int8, fp16") as info:
        parse_quantization("int4")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"invalid quantization"):
        load_model("tiny", quantization="Q4", progress=False)


def test_policies_by_option_checkpoint_and_device():
    dense, q4 = random_weights(TINY), quantized_checkpoint(TINY, "q4")
    f32 = torch.float32
    p = resolve_policy("none", "cpu", f32, q4)
    assert (p.small, p.large, p.head_small) == ("dense", "dense", "dense")
    p = resolve_policy("q4", "cpu", f32, dense)
    assert (p.small, p.large, p.head_small, p.head_large) == ("q4", "q4", "fp16", "fp16")
    assert resolve_policy("tuned", "cpu", f32, dense).small == "dense"  # nothing quantized: as stored
    assert resolve_policy("auto", "cuda", f32, q4).small == "dense"  # no weight-only kernels there
    p = resolve_policy("tuned", "cpu", f32, q4, crossover=4)
    assert p.small == "native" and p.large in ("fp16", "dense") and p.crossover == 4
    with pytest.raises(ValueError, match=r"crossover=-1 is out of range: must be >= 0 rows"):
        resolve_policy("tuned", "cpu", f32, q4, crossover=-1)


def test_auto_runs_kvserves_kernels_at_every_row_count():
    """auto on CPU with the kernels built: one form per linear, no crossover, for quantized and dense
    checkpoints alike (the forms whose rows do not depend on their batch)."""
    require_kernels()
    p = resolve_policy("auto", "cpu", torch.float32, quantized_checkpoint(TINY, "q4"))
    assert (p.small, p.large, p.head_small, p.head_large) == ("kernel",) * 4
    stored = quantized_checkpoint(TINY, "q4", seed=1)
    model = build_transformer(TINY, stored, quantization="auto")
    wkv = model.layers[0].attention.wkv
    assert wkv.small is wkv.large and wkv.small.name == "q4q8"
    dense = build_transformer(TINY, random_weights(TINY), quantization="auto")
    assert dense.weights == "f32; lm head f32"


@pytest.mark.parametrize("kind", ["q4", "int8", "fp16"])
def test_quantized_model_matches_its_dequantized_twin(kind):
    stored = quantized_checkpoint(TINY, "q4" if kind == "fp16" else kind)
    model = build_transformer(TINY, stored, quantization=kind)
    twin = build_transformer(TINY, dequantized(stored), quantization="none")
    assert model.layers[0].attention.wkv.small.name == kind
    assert model.output.small.name == "fp16"  # the LM head: float32 logits
    with torch.inference_mode():
        out, ref = model(ids()), twin(ids())
    assert out.dtype == torch.float32
    tol = 1e-3 if kind == "fp16" else 3e-2  # fp16: weights rounded to 11 bits; q4 / int8: bf16 activations
    assert rel_error(out, ref) < tol
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_q4_keeps_whole_groups_only():
    """A projection whose inputs are not whole groups of 32 runs int8 instead of q4."""
    cfg = replace(TINY, ffn_dim=48, qkv_bias=False)
    model = build_transformer(cfg, random_weights(cfg), quantization="q4")
    ffn = model.layers[0].feed_forward
    assert ffn.w13.small.name == "q4" and ffn.w2.small.name == "int8"  # w2 reads 48 inputs
    with torch.inference_mode():
        assert torch.isfinite(model(ids())).all()


def first_token_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    """One paged step of B rows: each token of token_ids (B,) opens its own sequence."""
    B = token_ids.shape[0]
    cache = KVCache.for_model(model.config, budget_bytes=1 << 20, block_size=4, dtype=model.dtype, device="cpu")
    meta = PagedMetadata.build(query_lens=[1] * B, context_lens=[1] * B, block_tables=[[b + 1] for b in range(B)],
                               block_size=4)
    with torch.inference_mode():
        return model(token_ids, kv_cache=cache, meta=meta)


def test_tuned_picks_the_form_by_row_count():
    """tuned with the crossover pinned at 4 rows: a step of 4 rows runs exactly the q4 model, one of
    6 exactly the model of the large form."""
    stored = quantized_checkpoint(TINY, "q4", seed=1)
    auto = build_transformer(TINY, stored, quantization="tuned", crossover=4)
    wkv = auto.layers[0].attention.wkv
    assert wkv.small.name == "q4" and wkv.large.name in ("fp16", "dense") and wkv.crossover == 4
    assert auto.weights == f"q4 up to 4 rows, else {wkv.large.name}; lm head fp16"
    large = build_transformer(TINY, stored, quantization="fp16" if wkv.large.name == "fp16" else "none")
    large.output = auto.output  # "none" would run a dense head; tuned's is fp16 at every size
    q4 = build_transformer(TINY, stored, quantization="q4")
    few, many = ids(2, seed=2).view(-1), ids(3, seed=3).view(-1)  # steps of 4 and 6 rows
    assert torch.equal(first_token_logits(auto, few), first_token_logits(q4, few))
    assert torch.equal(first_token_logits(auto, many), first_token_logits(large, many))
    assert not torch.equal(first_token_logits(q4, many), first_token_logits(large, many))


@pytest.mark.parametrize("kind", ["q4", "int8", "fp16", "none"])
def test_variants_of_a_quantized_model(kind):
    """mha repeats K/V heads: the logits stay; Q is shared; mqa pools K/V like the dense mean of
    the dequantized heads, within a quantization step."""
    stored = quantized_checkpoint(TINY, "q4")
    model = build_transformer(TINY, stored, quantization=kind)
    mha, mqa = with_variant(model, "mha"), with_variant(model, "mqa")
    with torch.inference_mode():
        torch.testing.assert_close(mha(ids()), model(ids()), rtol=1e-5, atol=1e-5)
        assert torch.isfinite(mqa(ids())).all()
    for converted in (mha, mqa):
        assert converted.layers[1].attention.wq is model.layers[1].attention.wq
        assert type(converted.layers[1].attention.wkv.small.source) is type(model.layers[1].attention.wkv.small.source)
    D, kv_rows = TINY.head_dim, TINY.n_kv_heads * TINY.head_dim
    old = model.layers[1].attention.wkv.small.dequantize()[:kv_rows]  # K: (Hkv * D, dim)
    pooled = old.view(TINY.n_kv_heads, D, -1).mean(0)
    got = mqa.layers[1].attention.wkv.small.dequantize()[:D]
    step = {"q4": 0.2, "int8": 0.02, "fp16": 1e-3, "none": 1e-6}[kind] * pooled.abs().max()
    assert (got - pooled).abs().max() <= step
