"""Paged forward == no-cache forward, for ragged batches over shuffled, non-contiguous blocks.

Sequences are stepped through `Transformer.forward(input_ids[N], kv_cache=, meta=)` the way the
engine does (prefill, chunked prefill after a cached prefix, decode, mixed in one batch), with
block ids handed out by a shuffled list in the test itself. The reference is the dense forward
of each whole sequence with naive attention: causal, so its row p sees exactly tokens 0..p.
Also: paged attention alone against a float64 computation from the definition, with tiles small
enough to cross pages, and prefix sharing at the tensor level.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from kvcache.kv_cache import KVCache, KVLayout
from kvcache.metadata import PagedMetadata
from model.config import PRESETS, ModelConfig
from model.paged_attention import PAGED_ATTENTION_IMPLS, paged_flash_attention
from model.paged_plan import PagedPlan
from model.transformer import Transformer, random_transformer

TINY = PRESETS["tiny"]  # 4 query heads of 16 dims, 2 layers, vocab 259
CONFIGS = {"mha": TINY.with_kv_heads(4), "gqa": TINY.with_kv_heads(2), "mqa": TINY.with_kv_heads(1)}
ATTENTIONS = list(PAGED_ATTENTION_IMPLS)
BLOCK_SIZES = [1, 5, 16]  # 5 divides none of the lengths below
TOL = {"rtol": 1e-5, "atol": 2e-5}  # observed differences are <= 2.2e-6


@pytest.fixture(scope="module")
def models() -> dict[str, Transformer]:
    return {name: random_transformer(cfg, seed=i) for i, (name, cfg) in enumerate(CONFIGS.items())}


class BlockList:
    """The test's own allocator: shuffled ids, never block 0 (the null block tables are padded with)."""

    def __init__(self, num_blocks: int, seed: int):
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise AssertionError("test cache too small")
        taken, self.free = self.free[:n], self.free[n:]
        return taken


@dataclass
class Seq:
    tokens: list[int]
    table: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are already in the cache


def new_cache(cfg: ModelConfig, block_size: int, num_blocks: int) -> KVCache:
    layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 4, block_size)
    return KVCache(layout, num_blocks, torch.float32, "cpu")


def step(model: Transformer, cache: KVCache, blocks: BlockList, batch: list[tuple[Seq, int]],
         logits_indices: torch.Tensor | None = None) -> list[torch.Tensor] | torch.Tensor:
    """Run one paged forward over (sequence, new tokens) pairs; returns each sequence's logits."""
    bs = cache.block_size
    for seq, n_new in batch:
        needed = -(-(seq.cached + n_new) // bs)
        seq.table += blocks.take(needed - len(seq.table))
    meta = PagedMetadata.build(
        query_lens=[n for _, n in batch], context_lens=[s.cached + n for s, n in batch],
        block_tables=[s.table for s, _ in batch], block_size=bs,
    )
    input_ids = torch.tensor([t for s, n in batch for t in s.tokens[s.cached:s.cached + n]])
    logits = model(input_ids, kv_cache=cache, meta=meta, logits_indices=logits_indices)
    for seq, n_new in batch:
        seq.cached += n_new
    if logits_indices is not None:
        return logits
    return list(logits.split([n for _, n in batch]))


def dense_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    attention = model.attention
    model.set_attention("naive")
    try:
        return model(torch.tensor([tokens]))[0]
    finally:
        model.set_attention(attention)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TINY.vocab_size) for _ in range(n)]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_mixed_ragged_steps_match_dense_forward(models, variant, attention, block_size):
    model = models[variant]
    model.set_attention(attention)
    rng = random.Random(f"{variant}-{attention}-{block_size}")
    # (prefix prefilled in step 1, new tokens in step 2); lengths cross block boundaries.
    plan = {"decode": (rng.randint(17, 40), 1), "chunk": (rng.randint(3, 20), rng.randint(6, 18)),
            "fresh": (0, rng.randint(11, 35)), "short": (0, 2), "decode2": (rng.randint(2, 9), 1)}
    seqs = {name: Seq(random_tokens(rng, prefix + new + 1)) for name, (prefix, new) in plan.items()}
    num_blocks = 200 // block_size + 40
    cache, blocks = new_cache(CONFIGS[variant], block_size, num_blocks), BlockList(num_blocks, 1)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in seqs}

    steps = [
        {n: plan[n][0] for n in ("decode", "chunk", "decode2")},  # prefill the prefixes
        {n: plan[n][1] for n in ("chunk", "decode", "fresh", "decode2", "short")},  # mixed
        {n: 1 for n in ("short", "fresh", "decode", "chunk", "decode2")},  # all decode
    ]
    for new_tokens in steps:
        logits = step(model, cache, blocks, [(seqs[n], k) for n, k in new_tokens.items()])
        for name, rows in zip(new_tokens, logits):
            got[name].append(rows)

    for name, seq in seqs.items():
        assert seq.cached == len(seq.tokens)
        torch.testing.assert_close(torch.cat(got[name]), dense_logits(model, seq.tokens), **TOL, msg=name)


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_long_context_spans_several_tiles(models, attention, block_size):
    """300 tokens: two key tiles of the paged flash path (256-token tiles), prefilled in chunks of
    200 (two 128-token query tiles) and 99 beside a short prompt, then a decode beside its decode."""
    model = models["gqa"]
    model.set_attention(attention)
    rng = random.Random(block_size)
    long, short = Seq(random_tokens(rng, 300)), Seq(random_tokens(rng, 6))
    num_blocks = 400 // block_size + 8
    cache, blocks = new_cache(CONFIGS["gqa"], block_size, num_blocks), BlockList(num_blocks, 2)
    got_long = step(model, cache, blocks, [(long, 200)])
    got_short, rows = step(model, cache, blocks, [(short, 5), (long, 99)])
    got_long.append(rows)
    rows, last_short = step(model, cache, blocks, [(long, 1), (short, 1)])
    got_long.append(rows)
    torch.testing.assert_close(torch.cat(got_long), dense_logits(model, long.tokens), **TOL)
    torch.testing.assert_close(torch.cat([got_short, last_short]), dense_logits(model, short.tokens), **TOL)


def test_logits_indices_pick_rows(models):
    model = models["gqa"]
    model.set_attention("flash")
    rng = random.Random(3)
    cache, blocks = new_cache(CONFIGS["gqa"], 5, 40), BlockList(40, 3)
    a, b, c = Seq(random_tokens(rng, 12)), Seq(random_tokens(rng, 7)), Seq(random_tokens(rng, 9))
    batch = [(a, 12), (b, 7), (c, 9)]
    full = torch.cat(step(model, cache, blocks, batch))
    for seq in (a, b, c):  # the same step again writes the same K/V into the same slots
        seq.cached = 0
    last = torch.tensor([11, 18, 27])  # each sequence's last token in the flat batch
    picked = step(model, cache, blocks, batch, logits_indices=last)
    assert picked.shape == (3, TINY.vocab_size)
    torch.testing.assert_close(picked, full[last], rtol=1e-5, atol=1e-5)  # fewer rows: other matmul blocking
    torch.testing.assert_close(picked[1], dense_logits(model, b.tokens)[-1], **TOL)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_shared_prefix_blocks_give_identical_logits(models, attention):
    """One 40-token sequence written through table X; the same tokens then read through table Y
    that shares X's two full 16-token blocks and owns its tail block. Y computes only its tail
    (a prefix-cache hit), leaves the shared blocks untouched, and decodes exactly like X (each alone in
    its step, so the arithmetic is the same and only the page ids differ)."""
    model = models["gqa"]
    model.set_attention(attention)
    rng = random.Random(4)
    tokens = random_tokens(rng, 41)
    cache, blocks = new_cache(CONFIGS["gqa"], 16, 12), BlockList(12, 5)
    x = Seq(tokens)
    full = step(model, cache, blocks, [(x, 40)])[0]
    shared = x.table[:2]
    y = Seq(tokens, table=list(shared), cached=32)
    before = cache.k[:, shared].clone(), cache.v[:, shared].clone()
    tail = step(model, cache, blocks, [(y, 8)])[0]
    assert set(y.table[2:]).isdisjoint(x.table)
    assert torch.equal(cache.k[:, shared], before[0]) and torch.equal(cache.v[:, shared], before[1])
    torch.testing.assert_close(tail, full[32:], **TOL)
    [x_next], [y_next] = step(model, cache, blocks, [(x, 1)]), step(model, cache, blocks, [(y, 1)])
    assert torch.equal(x_next, y_next)  # same values through other page ids: bit for bit
    torch.testing.assert_close(x_next[0], dense_logits(model, tokens)[40], **TOL)


def reference_paged(q, k_cache, v_cache, tables, query_lens, context_lens) -> torch.Tensor:
    """Float64 attention from the definition, reading the cache one slot at a time."""
    Hkv, block_size, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // Hkv
    out, row = [], 0
    for table, q_len, ctx in zip(tables, query_lens, context_lens):
        slots = [(table[p // block_size], p % block_size) for p in range(ctx)]
        k = torch.stack([k_cache[b, :, o] for b, o in slots]).double()  # (ctx, Hkv, D)
        v = torch.stack([v_cache[b, :, o] for b, o in slots]).double()
        for i in range(q_len):
            pos = ctx - q_len + i  # sees keys 0..pos
            qi = q[row + i].double().view(Hkv, group, D)
            scores = torch.einsum("hgd,thd->hgt", qi, k[:pos + 1]) / math.sqrt(D)
            out.append(torch.einsum("hgt,thd->hgd", scores.softmax(-1), v[:pos + 1]).reshape(-1, D))
        row += q_len
    return torch.stack(out)


def plan_for(meta: PagedMetadata, Hq: int, Hkv: int, dtype: torch.dtype, **tiles) -> PagedPlan:
    return PagedPlan.build(meta, n_kv_heads=Hkv, group=Hq // Hkv, dtype=dtype, **tiles)


def random_paged_case(Hq: int, Hkv: int, block_size: int, query_lens_of, seed: str):
    """Random caches (num_blocks, Hkv, block_size, 16), shuffled tables, contexts of 1-45 tokens."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(block_size)
    context_lens = [rng.randint(1, 45) for _ in range(6)] + [1]
    query_lens = [query_lens_of(rng, ctx) for ctx in context_lens]
    blocks = BlockList(sum(-(-c // block_size) for c in context_lens) + 4, block_size)
    tables = [blocks.take(-(-c // block_size)) for c in context_lens]
    meta = PagedMetadata.build(query_lens=query_lens, context_lens=context_lens, block_tables=tables,
                               block_size=block_size)
    num_blocks = len(blocks.free) + sum(map(len, tables)) + 1
    k_cache = torch.randn(num_blocks, Hkv, block_size, 16, generator=gen)
    v_cache = torch.randn(num_blocks, Hkv, block_size, 16, generator=gen)
    q = torch.randn(sum(query_lens), Hq, 16, generator=gen)
    return meta, q, k_cache, v_cache, reference_paged(q, k_cache, v_cache, tables, query_lens, context_lens)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


HEADS = [(4, 4), (4, 2), (4, 1), (9, 3)]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_paged_attention_matches_definition(heads, block_size):
    """Random caches and mixed ragged batches; flash with key tiles of 1-2 pages (decodes sorted
    longest first and folded tile by tile) and 3-token query tiles."""
    Hq, Hkv = heads
    meta, q, k_cache, v_cache, ref = random_paged_case(
        Hq, Hkv, block_size, lambda rng, ctx: rng.choice([1, 1, ctx, max(1, ctx // 3)]), f"{heads}-{block_size}")
    outputs = {name: fn(q, k_cache, v_cache, plan_for(meta, Hq, Hkv, q.dtype)) for name, fn in PAGED_ATTENTION_IMPLS.items()}
    for tile_tokens in (block_size, 2 * block_size + 1):
        plan = plan_for(meta, Hq, Hkv, q.dtype, decode_tile_tokens=tile_tokens, prefill_tile_tokens=tile_tokens)
        outputs[f"flash tile {tile_tokens}"] = paged_flash_attention(q, k_cache, v_cache, plan, block_q=3)
    for name, out in outputs.items():
        assert out.shape == q.shape, name
        assert rel_error(out, ref) < 1e-5, name
    plan = plan_for(meta, Hq, Hkv, torch.bfloat16, decode_tile_tokens=block_size, prefill_tile_tokens=block_size)
    bf16 = paged_flash_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), plan)
    assert bf16.dtype == torch.bfloat16
    assert rel_error(bf16, ref) < 2e-2


@pytest.mark.parametrize("decode_tile_tokens", [None, 5, 16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_pure_decode_steps_match_definition_in_float64(heads, decode_tile_tokens):
    """A batch of decodes only (the engine's common step): every path in float64 against the
    definition. Flash runs one tile (no sorting, rows in place) or several (sorted, folded)."""
    Hq, Hkv = heads
    meta, q, k_cache, v_cache, ref = random_paged_case(Hq, Hkv, 5, lambda rng, ctx: 1, f"decode-{heads}")
    q, k_cache, v_cache = q.double(), k_cache.double(), v_cache.double()
    plan = plan_for(meta, Hq, Hkv, torch.float64, decode_tile_tokens=decode_tile_tokens)
    assert (plan.decode_rows is None) == (len(plan.decode_tiles) == 1)
    assert (decode_tile_tokens is None) == (len(plan.decode_tiles) == 1)
    outputs = {"flash": paged_flash_attention(q, k_cache, v_cache, plan)}
    for name in ("sdpa", "naive"):
        outputs[name] = PAGED_ATTENTION_IMPLS[name](q, k_cache, v_cache, plan_for(meta, Hq, Hkv, torch.float64,
                                                                                   decode_tile_tokens=None))
    for name, out in outputs.items():
        assert out.dtype == torch.float64, name
        assert rel_error(out, ref) < 1e-12, name
