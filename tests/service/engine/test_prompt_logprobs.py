"""Prompt logprobs from the engine equal the no-cache forward's log-softmax at every prompt position,
whatever the chunking, the batch, a prefix-cache hit or a preemption; and asking for them changes
nothing for the other requests of the batch."""
from __future__ import annotations

import random

import pytest
import torch

from model.sampling_params import SamplingParams
from tests.service.engine.engine_helpers import make_engine, run_all, tokens_of


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


@torch.inference_mode()
def reference(model, ids: list[int]) -> torch.Tensor:
    """Row i - 1: the log-softmax that scores token i, from one no-cache forward of the whole prompt."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def check(model, ids, entries, k):
    assert entries[0] is None and len(entries) == len(ids)
    lp = reference(model, ids)
    for i, got in enumerate(entries[1:], start=1):
        assert got.token_id == ids[i] and got.logprob == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        assert len(got.top) == k
        assert [v for _, v in got.top] == pytest.approx(lp[i - 1].topk(k).values.tolist(), abs=1e-4)
        assert [v for _, v in got.top] == pytest.approx([lp[i - 1, t].item() for t, _ in got.top], abs=1e-4)


@pytest.mark.parametrize("chunk", [7, 256])
def test_prompt_logprobs_match_the_reference_alone_and_in_a_batch(tiny, chunk):
    model, tok = tiny
    engine = make_engine(model, tok, max_num_batched_tokens=chunk)
    vocab = model.config.vocab_size
    prompts = [prompt(s, 20 + 9 * s, vocab) for s in range(4)]
    asking = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    alone = run_all(engine, [(p, plain) for p in prompts])
    mixed = run_all(engine, [(p, asking if i % 2 == 0 else plain) for i, p in enumerate(prompts)])
    for i, (p, outs) in enumerate(zip(prompts, mixed)):
        assert tokens_of(outs) == tokens_of(alone[i])  # the same tokens whoever asks for what
        if i % 2 == 0:
            check(model, p, outs[0].prompt_logprobs, 2)
            assert all(o.prompt_logprobs is None for o in outs[1:])
        else:
            assert all(o.prompt_logprobs is None for o in outs)
    engine.shutdown()


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    p = prompt(7, 70, model.config.vocab_size)
    run_all(engine, [(p, SamplingParams(max_tokens=2, temperature=0))])  # warms the prefix cache
    (outs,) = run_all(engine, [(p, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))])
    check(model, p, outs[0].prompt_logprobs, 0)
    assert outs[0].num_cached_tokens == 0
    (again,) = run_all(engine, [(p, SamplingParams(max_tokens=2, temperature=0))])
    assert again[0].num_cached_tokens == 64  # the others still hit
    engine.shutdown()


def test_prompt_logprobs_survive_preemption(tiny):
    model, tok = tiny
    cfg = model.config
    bytes_per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * 16
    engine = make_engine(model, tok, kv_cache_memory=12 * bytes_per_block, max_model_len=160, max_num_batched_tokens=16)
    prompts = [prompt(s, 40 + s, cfg.vocab_size) for s in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = run_all(engine, [(p, params) for p in prompts])
    assert engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        check(model, p, o[0].prompt_logprobs, 1)
    engine.shutdown()
