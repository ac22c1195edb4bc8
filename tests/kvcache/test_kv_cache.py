"""KV storage sizing: bytes per token and block, blocks and tokens per budget, parse_bytes, tensors.

Expected numbers are written out as arithmetic from the definition
bytes_per_token = 2 (K and V) * n_layers * n_kv_heads * head_dim * dtype_bytes,
with SmolLM2-135M's 30 layers and head_dim 64, so a wrong factor anywhere shows.
"""
from __future__ import annotations

import pytest
import torch

from kvcache.kv_cache import KVCache, KVLayout, parse_bytes
from model.config import PRESETS

SMOLLM2 = PRESETS["smollm2-135m"]
VARIANTS = {"mha": 9, "gqa-3": 3, "mqa": 1}  # n_kv_heads of SmolLM2's 9 query heads
DTYPES = {torch.float32: 4, torch.bfloat16: 2}
GiB = 2**30


def layout(n_kv_heads: int, dtype_bytes: int, block_size: int = 16) -> KVLayout:
    return KVLayout(SMOLLM2.n_layers, n_kv_heads, SMOLLM2.head_dim, dtype_bytes, block_size)


@pytest.mark.parametrize(("n_kv", "dtype_bytes", "expected"), [
    (3, 4, 2 * 30 * 3 * 64 * 4),  # GQA float32: 46080
    (9, 4, 2 * 30 * 9 * 64 * 4),  # MHA float32: 138240
    (1, 4, 2 * 30 * 1 * 64 * 4),  # MQA float32: 15360
    (3, 2, 2 * 30 * 3 * 64 * 2),  # GQA bfloat16: 23040
    (9, 2, 2 * 30 * 9 * 64 * 2),  # MHA bfloat16: 69120
    (1, 2, 2 * 30 * 1 * 64 * 2),  # MQA bfloat16: 7680
])
def test_bytes_per_token_and_block(n_kv, dtype_bytes, expected):
    kv = layout(n_kv, dtype_bytes)
    assert kv.bytes_per_token == expected
    assert kv.bytes_per_block == 16 * expected
    assert layout(3, 4).bytes_per_token == 46080  # the worked example


@pytest.mark.parametrize("block_size", [1, 16, 5])
@pytest.mark.parametrize("dtype_bytes", DTYPES.values())
def test_num_blocks_is_budget_floor_divided_by_block_bytes(dtype_bytes, block_size):
    for n_kv in VARIANTS.values():
        kv = layout(n_kv, dtype_bytes, block_size)
        for budget in (GiB, 512 * 2**20, 2 * 10**9, 3 * kv.bytes_per_block - 1, 3 * kv.bytes_per_block):
            blocks = budget // kv.bytes_per_block
            assert kv.num_blocks(budget) == blocks
            assert blocks * kv.bytes_per_block <= budget < (blocks + 1) * kv.bytes_per_block
            assert kv.capacity_tokens(budget) == blocks * block_size  # the null block is beside the budget


@pytest.mark.parametrize("dtype_bytes", DTYPES.values())
def test_mqa_holds_nine_times_the_tokens_of_mha(dtype_bytes):
    """Budgets that are whole multiples of MHA's bytes_per_block make every floor division exact
    (MQA's block is exactly 1/9 of MHA's), so MQA gets exactly 9x the blocks of MHA and GQA-3
    exactly 3x; the null block sits beside the budget, so capacities are in ratio 9 and 3 too."""
    mha, gqa, mqa = (layout(n, dtype_bytes) for n in VARIANTS.values())
    assert mha.bytes_per_token == 9 * mqa.bytes_per_token == 3 * gqa.bytes_per_token
    for blocks in (2, 1000, GiB // mha.bytes_per_block):
        budget = blocks * mha.bytes_per_block
        assert mha.num_blocks(budget) == blocks
        assert mqa.num_blocks(budget) == 9 * blocks
        assert gqa.num_blocks(budget) == 3 * blocks
        slots = {name: kv.capacity_tokens(budget) for name, kv in zip(VARIANTS, (mha, gqa, mqa))}
        assert slots["mqa"] == 9 * slots["mha"] == 9 * blocks * 16
        assert slots["gqa-3"] == 3 * slots["mha"]
    # At an arbitrary budget MQA's floor division keeps up to 8 more blocks than 9x MHA's.
    assert 0 <= mqa.num_blocks(GiB + 12345) - 9 * mha.num_blocks(GiB + 12345) < 9


def test_one_gib_bfloat16_capacities():
    """1 GiB of bf16 blocks of 16: whole blocks only."""
    expected = {"mha": GiB // (16 * 69120) * 16, "gqa-3": GiB // (16 * 23040) * 16, "mqa": GiB // (16 * 7680) * 16}
    assert expected == {"mha": 15520, "gqa-3": 46592, "mqa": 139808}
    for name, n_kv in VARIANTS.items():
        assert layout(n_kv, 2).capacity_tokens(GiB) == expected[name]


@pytest.mark.parametrize(("text", "expected"), [
    ("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("64KiB", 64 * 1024), ("1.5GiB", 3 * 2**29),
    ("100MB", 10**8), ("1gib", 2**30), (" 256 MiB ", 256 * 2**20), ("4096", 4096), ("1e9", 10**9), (123, 123),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "abc", "1XB", "-5MiB", "1.2.3GB", "1 Gi B", "ten MiB"])
def test_parse_bytes_rejects_malformed_sizes(text):
    with pytest.raises(ValueError, match=r"invalid size .*use a number with a unit such as 512MiB, 1GiB or 2GB"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["0", "0GiB", 0, -4])
def test_parse_bytes_rejects_non_positive_sizes(text):
    with pytest.raises(ValueError, match=r"must be positive"):
        parse_bytes(text)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv", VARIANTS.values())
def test_kv_cache_tensors(n_kv, dtype):
    cfg = SMOLLM2.with_kv_heads(n_kv)
    kv = layout(n_kv, DTYPES[dtype], block_size=16)
    budget = 5 * kv.bytes_per_block + kv.bytes_per_block // 2  # 5.5 blocks: 5 whole ones
    cache = KVCache.for_model(cfg, budget_bytes=budget, block_size=16, dtype=dtype, device="cpu")
    assert cache.num_blocks == 6 and cache.block_size == 16  # 5 data blocks and the null block
    assert cache.capacity_tokens == 5 * 16
    for tensor in (cache.k, cache.v):
        assert tensor.shape == (30, 6, n_kv, 16, 64)  # (n_layers, num_blocks, Hkv, block_size, D)
        assert tensor.dtype == dtype and tensor.device.type == "cpu"
        assert not tensor.any()  # starts zeroed: padded reads of the null block are finite
    assert cache.nbytes == 6 * kv.bytes_per_block  # the budget's 5 blocks plus the null block
    assert cache.k.data_ptr() != cache.v.data_ptr()


def test_too_small_budget_is_a_clear_error():
    kv = layout(3, 4)

    def cache(budget: int) -> KVCache:
        return KVCache.for_model(SMOLLM2, budget_bytes=budget, block_size=16, dtype=torch.float32, device="cpu")

    with pytest.raises(ValueError, match=rf"KV budget holds 0 blocks of {kv.bytes_per_block} bytes; "
                                         r"need at least 1: raise kv_cache_memory"):
        cache(kv.bytes_per_block - 1)
    assert cache(kv.bytes_per_block).capacity_tokens == 16
