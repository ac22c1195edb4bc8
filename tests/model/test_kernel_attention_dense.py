"""kvserve's paged attention kernel and fixed-order dense kernel: against float64 definitions, and a
row's bits independent of its batch, of how its prompt was chunked, of page ids and of threads."""
from __future__ import annotations

import random

import pytest
import torch

from kvcache.metadata import PagedMetadata
from model.kernel_forms import F32Form
from model.paged_attention import paged_kernel_attention
from model.paged_plan import PagedPlan
from tests.kvcache.test_paged_forward import HEADS, random_paged_case, reference_paged, rel_error
from tests.model.kernel_support import activations, require_kernels


@pytest.fixture(autouse=True)
def _kernels():
    require_kernels()


def kernel(q, k_cache, v_cache, meta: PagedMetadata, Hkv: int) -> torch.Tensor:
    plan = PagedPlan.build(meta, n_kv_heads=Hkv, group=q.shape[1] // Hkv, dtype=q.dtype, kernel=True)
    assert not plan.decode_tiles and not plan.prefills  # the kernel's plan builds no tiles
    return paged_kernel_attention(q, k_cache, v_cache, plan)


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_paged_kernel_matches_definition(heads, block_size):
    Hq, Hkv = heads
    meta, q, k_cache, v_cache, ref = random_paged_case(
        Hq, Hkv, block_size, lambda rng, ctx: rng.choice([1, 1, ctx, max(1, ctx // 3)]), f"k-{heads}-{block_size}")
    out = kernel(q, k_cache, v_cache, meta, Hkv)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_error(out, ref) < 1e-5
    bf16 = kernel(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), meta, Hkv)
    assert bf16.dtype == torch.bfloat16 and rel_error(bf16, ref) < 2e-2


def _cache(num_blocks: int, Hkv: int, bs: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, Hkv, bs, D, generator=gen), torch.randn(num_blocks, Hkv, bs, D, generator=gen)


@pytest.mark.parametrize("seed", range(3))
def test_a_query_row_is_the_same_in_any_step(seed, threads):
    """One sequence of 70 tokens: its rows computed as one prefill, as chunks of random sizes, as
    decodes one by one, among other sequences, through other page ids, on 1 and 2 threads: equal."""
    rng = random.Random(seed)
    Hq, Hkv, D, bs, T = 9, 3, 64, 16, 70
    k_cache, v_cache = _cache(64, Hkv, bs, D, seed)
    pages = rng.sample(range(1, 64), -(-T // bs))
    q = torch.randn(T, Hq, D, generator=torch.Generator().manual_seed(seed))
    whole = kernel(q, k_cache, v_cache, PagedMetadata.build(query_lens=[T], context_lens=[T], block_tables=[pages],
                                                            block_size=bs), Hkv)
    ref = reference_paged(q, k_cache, v_cache, [pages], [T], [T])
    assert rel_error(whole, ref) < 1e-5
    # chunks of random sizes, each in a step with random other sequences
    start, rows = 0, []
    while start < T:
        n = min(T - start, rng.choice([1, 1, 3, 16, 17, 40]))
        others = [(rng.randint(1, 5), rng.randint(5, 60)) for _ in range(rng.randint(0, 4))]
        lens = [(n, start + n)] + others
        rng.shuffle(lens)
        mine = lens.index((n, start + n))
        tables = [pages if i == mine else rng.sample(range(1, 64), -(-ctx // bs)) for i, (_, ctx) in enumerate(lens)]
        gen = torch.Generator().manual_seed(start)
        qs = [q[start:start + n] if i == mine else torch.randn(ql, Hq, D, generator=gen) for i, (ql, _) in enumerate(lens)]
        meta = PagedMetadata.build(query_lens=[ql for ql, _ in lens], context_lens=[c for _, c in lens],
                                   block_tables=tables, block_size=bs)
        threads(rng.choice([1, 2]))
        out = kernel(torch.cat(qs), k_cache, v_cache, meta, Hkv)
        lo = sum(ql for ql, _ in lens[:mine])
        rows.append(out[lo:lo + n])
        start += n
    assert torch.equal(torch.cat(rows), whole)
    # the same keys through other page ids
    moved = rng.sample(range(1, 64), len(pages))
    k2, v2 = k_cache.clone(), v_cache.clone()
    k2[moved], v2[moved] = k_cache[pages], v_cache[pages]
    again = kernel(q, k2, v2, PagedMetadata.build(query_lens=[T], context_lens=[T], block_tables=[moved], block_size=bs), Hkv)
    assert torch.equal(again, whole)


@pytest.mark.parametrize("shape", [(37, 64), (576, 576), (200, 96)], ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_f32_form_matches_float64_and_is_row_invariant(shape, threads):
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) / k ** 0.5
    form = F32Form(w)
    x = activations(70, k, seed=k)
    out = form(x)
    ref = x.double() @ w.double().t()
    assert out.dtype == torch.float32 and out.shape == (70, n)
    assert (out.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    assert torch.equal(form.dequantize(), w)
    probe = x[5:6]
    alone = form(probe)
    for m in (1, 2, 3, 4, 5, 9, 33, 70):
        threads(1 + m % 2)
        batch = torch.cat((x[:m], probe, x[m:])) if m < 70 else torch.cat((x, probe))
        assert torch.equal(form(batch)[m:m + 1], alone), f"row changed in a batch of {batch.shape[0]}"


@pytest.mark.parametrize("dim", [576, 64, 13])
def test_rms_norm_kernel_matches_float64_and_is_row_invariant(dim, threads):
    from model.transformer import RMSNorm
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(200, dim, generator=gen) * torch.rand(200, 1, generator=gen) * 3
    w = torch.rand(dim, generator=gen) + 0.5
    norm = RMSNorm(w, 1e-5, kernel=True)
    with torch.inference_mode():
        out = norm(x)
        ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
        assert out.dtype == torch.float32 and (out.double() - ref).abs().max().item() < 1e-5
        alone = norm(x[7:8])
        for m in (1, 63, 64, 65, 199):
            threads(1 + m % 2)
            assert torch.equal(norm(torch.cat((x[:m], x[7:8])))[m:m + 1], alone)
        assert norm(x.bfloat16()).dtype == torch.bfloat16
    x.requires_grad_(True)  # training: the autograd path (F.rms_norm), same values
    torch.testing.assert_close(norm(x), out, rtol=1e-5, atol=1e-5)
