"""The engine on the real SmolLM2-135M: continuous batching, preemption and prefix caching must
give exactly the greedy tokens of the one-request-at-a-time no-cache reference."""
from __future__ import annotations

import random

import pytest

from kvcache.kv_cache import KVLayout
from model.sampling_params import SamplingParams
from tests.service.engine.engine_helpers import make_engine, reference_greedy, run_all, tokens_of

pytestmark = pytest.mark.slow

MAX_TOKENS = 5


def prompts_for(tokenizer, n: int, seed: int, shared_prefix: str = "") -> list[list[int]]:
    """Natural-ish prompts of mixed lengths (a few words to ~60 tokens); every other one prefixed."""
    rng = random.Random(seed)
    words = ("the river city light engine paper garden music history number simple quickly under "
             "between people language small forest winter").split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
        out.append(tokenizer.encode((shared_prefix if i % 2 == 0 else "") + text))
    return out


@pytest.fixture(scope="module")
def references(smollm2):
    model, tokenizer = smollm2
    cache = {}

    def ref(prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            cache[key] = reference_greedy(model, prompt, MAX_TOKENS)
        return cache[key]
    return ref


def check(outs, prompts, ref):
    for prompt, outputs in zip(prompts, outs):
        assert outputs[-1].finish_reason == "length"
        assert tokens_of(outputs) == ref(prompt)


def test_32_concurrent_requests_match_one_at_a_time(smollm2, references):
    model, tokenizer = smollm2
    engine = make_engine(model, tokenizer, kv_cache_memory=64 << 20, max_num_batched_tokens=256)
    prompts = prompts_for(tokenizer, 32, seed=0)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    check(run_all(engine, [(p, params) for p in prompts]), prompts, references)
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


def test_preemption_under_a_small_kv_budget_keeps_tokens_exact(smollm2, references):
    model, tokenizer = smollm2
    bytes_per_block = KVLayout(model.config.n_layers, model.config.n_kv_heads, model.config.head_dim, 4, 16).bytes_per_block
    engine = make_engine(model, tokenizer, kv_cache_memory=10 * bytes_per_block, max_model_len=160)
    prompts = [p for p in prompts_for(tokenizer, 40, seed=0) if len(p) >= 20][:16]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    check(run_all(engine, [(p, params) for p in prompts]), prompts, references)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


def test_shared_prefix_hits_the_prefix_cache_and_keeps_tokens_exact(smollm2, references):
    model, tokenizer = smollm2
    engine = make_engine(model, tokenizer, kv_cache_memory=64 << 20)
    system = "You are a careful assistant who answers questions about rivers, cities and music. " * 3
    prompts = prompts_for(tokenizer, 16, seed=1, shared_prefix=system)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    first = run_all(engine, [(prompts[0], params)])
    outs = run_all(engine, [(p, params) for p in prompts])
    check(first + outs, [prompts[0]] + prompts, references)
    assert engine.stats().kv.prefix_hits_tokens >= 16 * 7
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()
