"""Attention variants of a loaded checkpoint: mha is exact, fewer K/V heads mean-pool, bad names fail.

The SmolLM2 tests (slow) use the session model; the rest run on tiny random models and compare
against float64 computations done here by hand.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import PRESETS
from model.loader import load_model
from model.quantized import dequantize
from model.transformer import checkpoint_weights, random_transformer
from model.variants import with_variant


def qkv_rows(model, layer: int, part: str) -> torch.Tensor:
    """One projection ("q", "k" or "v") of a layer as the checkpoint names it, dequantized."""
    return dequantize(checkpoint_weights(model)[f"layers.{layer}.attention.w{part}.weight"])


def qkv_bias_rows(model, layer: int, part: str) -> torch.Tensor:
    return checkpoint_weights(model)[f"layers.{layer}.attention.w{part}.bias"]


@pytest.fixture(scope="module")
def smollm2_ids(smollm2):
    _, tokenizer = smollm2
    return torch.tensor([tokenizer.encode("Grouped-query attention shares keys and values.")])


@pytest.mark.slow
def test_smollm2_mha_gives_native_logits(smollm2, smollm2_ids):
    model, _ = smollm2
    mha = with_variant(model, "mha")
    assert mha.config.n_kv_heads == 9
    assert qkv_rows(mha, 0, "k").shape == (9 * 64, 576)
    with torch.inference_mode():
        torch.testing.assert_close(mha(smollm2_ids), model(smollm2_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant, n_kv", [("mqa", 1), ("gqa-1", 1), ("gqa-3", 3), ("gqa-9", 9)])
def test_smollm2_variant_shapes(smollm2, variant, n_kv):
    model, _ = smollm2
    converted = with_variant(model, variant)
    assert converted.config.n_kv_heads == n_kv
    for i in range(len(converted.layers)):
        assert qkv_rows(converted, i, "k").shape == qkv_rows(converted, i, "v").shape == (n_kv * 64, 576)
        assert torch.equal(qkv_rows(converted, i, "q"), qkv_rows(model, i, "q"))


@pytest.mark.slow
def test_smollm2_mqa_logits_finite(smollm2, smollm2_ids):
    model, _ = smollm2
    with torch.inference_mode():
        logits = with_variant(model, "mqa")(smollm2_ids)
    assert logits.shape == (1, smollm2_ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa-2", "gqa-4", "gqa-x", "gqa-", "foo", "MQA", ""])
def test_smollm2_bad_variant_names_valid_choices(smollm2, variant):
    model, _ = smollm2
    with pytest.raises(ValueError, match=r"valid N: 1, 3, 9") as info:
        with_variant(model, variant)
    assert repr(variant) in str(info.value) and "\n" not in str(info.value)


def test_load_model_rejects_bad_variant_before_loading():
    with pytest.raises(ValueError, match=r"invalid variant 'gqa-3'.*valid N: 1, 2, 4"):
        load_model("tiny", variant="gqa-3", progress=False)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("variant, n_kv", [("mqa", 1), ("gqa-2", 2)])
def test_mean_pooling_matches_float64_mean(qkv_bias, variant, n_kv):
    cfg = replace(PRESETS["tiny"], n_heads=4, n_kv_heads=4, qkv_bias=qkv_bias)  # an MHA model
    model = random_transformer(cfg, seed=1)
    pooled = with_variant(model, variant)
    D, group = cfg.head_dim, cfg.n_heads // n_kv
    for i in range(cfg.n_layers):
        for part in "kv":
            pairs = [(qkv_rows(model, i, part), qkv_rows(pooled, i, part))]
            if qkv_bias:
                pairs.append((qkv_bias_rows(model, i, part), qkv_bias_rows(pooled, i, part)))
            for tensor, got in pairs:
                heads = tensor.double().reshape(cfg.n_heads, D, -1)  # (H, D, dim or 1)
                expected = torch.stack([heads[g * group:(g + 1) * group].sum(0) / group for g in range(n_kv)])
                torch.testing.assert_close(got.double(), expected.reshape(got.shape), rtol=0, atol=1e-7)


def test_tiny_mha_gives_native_logits():
    model = random_transformer(PRESETS["tiny"], seed=2)  # GQA: 4 query heads, 2 K/V heads
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(with_variant(model, "mha")(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["mha", "mqa", "native"])
def test_with_variant_shares_all_but_kv(variant):
    model = random_transformer(replace(PRESETS["tiny"], qkv_bias=True), seed=3)
    converted = with_variant(model, variant)
    assert converted.tok_embeddings is model.tok_embeddings and converted.output is model.output
    assert converted.norm is model.norm
    for ours, theirs in zip(model.layers, converted.layers):
        for name in ("attention_norm", "ffn_norm", "feed_forward"):
            assert getattr(ours, name) is getattr(theirs, name), name
        assert ours.attention.wq is theirs.attention.wq and ours.attention.wo is theirs.attention.wo
        assert (ours.attention.wkv is theirs.attention.wkv) == (variant == "native")


@pytest.mark.slow
@pytest.mark.parametrize("part", ["k", "v"])
def test_smollm2_three_kv_heads_pool_to_one_as_their_float64_mean(smollm2, part):
    model, _ = smollm2
    mqa = with_variant(model, "mqa")
    D = model.config.head_dim
    for i in (0, 14, 29):
        native = qkv_rows(model, i, part).double().reshape(3, D, -1)  # (3, D, dim)
        expected = (native[0] + native[1] + native[2]) / 3
        got = qkv_rows(mqa, i, part).double()
        assert got.shape == (D, 576)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("variant, n_kv", [("gqa-3", 3), ("gqa-6", 6)])
def test_twelve_heads_four_kv_heads_regroup_through_mha(qkv_bias, variant, n_kv):
    # 4 -> 3 and 4 -> 6 K/V heads: neither count divides the other, so each query head's K/V head is
    # repeated out to MHA (12 heads) and the new groups are means over the query heads they serve
    cfg = replace(PRESETS["tiny"], n_heads=12, n_kv_heads=4, head_dim=8, dim=96, qkv_bias=qkv_bias)
    model = random_transformer(cfg, seed=4)
    converted = with_variant(model, variant)
    assert converted.config.n_kv_heads == n_kv
    D, n_heads = cfg.head_dim, cfg.n_heads
    for i in range(cfg.n_layers):
        for part in "kv":
            pairs = [(qkv_rows(model, i, part), qkv_rows(converted, i, part))]
            if qkv_bias:
                pairs.append((qkv_bias_rows(model, i, part), qkv_bias_rows(converted, i, part)))
            for tensor, got in pairs:
                heads = tensor.double().reshape(cfg.n_kv_heads, D, -1)          # (4, D, dim or 1)
                per_query = [heads[h // (n_heads // cfg.n_kv_heads)] for h in range(n_heads)]
                group = n_heads // n_kv
                expected = torch.stack([sum(per_query[g * group:(g + 1) * group]) / group for g in range(n_kv)])
                torch.testing.assert_close(got.double(), expected.reshape(got.shape), rtol=0, atol=1e-6)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.isfinite(converted(ids)).all()
