"""Same input, same output: a request's tokens and logprobs, bit for bit, whatever else the engine runs.

The reference is the request run alone on a fresh engine. The same request then runs inside random
batches of 1-31 other requests (greedy and seeded sampling mixed), with chunked prefill at several
chunk sizes, after a prefix-cache hit, under a KV budget small enough to preempt and recompute, on
1 and 2 threads and on a second engine built after the first (start-up probes run again): every
token id and every logprob must be equal, not close. The tiny model runs as `kvserve serve` serves
it (quantization and attention `auto`: kvserve's kernels); SmolLM2 as shipped (Q4_1, q4q8 / q8q8).
"""
from __future__ import annotations

import random

import pytest
import torch

from model.loader import load_model
from model.sampling_params import SamplingParams
from tests.service.engine.engine_helpers import make_engine, run_all


@pytest.fixture(scope="module")
def served_tiny():
    model, tok = load_model("tiny", dtype=torch.float32, quantization="auto", attention="auto", progress=False)
    assert model.attention == "kernel" and model.weights.startswith("f32"), (model.attention, model.weights)
    return model, tok


def fingerprint(outputs) -> tuple[list[int], list[float]]:
    """Token ids and the chosen tokens' logprobs of one request, in order."""
    ids = [t for out in outputs for t in out.new_token_ids]
    lps = [lp.logprob for out in outputs for lp in (out.logprobs or [])]
    return ids, lps


def targets(rng: random.Random, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """One greedy and one seeded request, with prompts long enough to be chunked."""
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(40, 90))]
    return [(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)),
            (prompt[::-1], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True, logprobs=1))]


def others(rng: random.Random, n: int, vocab: int) -> list[tuple[list[int], SamplingParams]]:
    reqs = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 120))]
        temperature = rng.choice([0.0, 0.7, 1.2])
        reqs.append((prompt, SamplingParams(max_tokens=rng.randint(1, 20), temperature=temperature, ignore_eos=True,
                                            seed=rng.randrange(1000) if temperature else None)))
    return reqs


def alone(model, tok, requests, **engine) -> list[tuple[list[int], list[float]]]:
    results = []
    for req in requests:
        eng = make_engine(model, tok, **engine)
        try:
            results.append(fingerprint(run_all(eng, [req])[0]))
        finally:
            eng.shutdown()
    return results


def in_batch(model, tok, requests, rest, rng, **engine) -> list[tuple[list[int], list[float]]]:
    """`requests` placed at random positions among `rest`, all submitted at once; their fingerprints."""
    batch = list(rest)
    slots = []
    for req in requests:
        slots.append(rng.randrange(len(batch) + 1))
        batch.insert(slots[-1], req)
    eng = make_engine(model, tok, **engine)
    try:
        outs = run_all(eng, batch)
        assert eng.stats().kv.used_blocks == 0
    finally:
        eng.shutdown()
    return [fingerprint(outs[batch.index(req)]) for req in requests]


@pytest.mark.parametrize("seed", range(4))
def test_requests_in_random_batches_and_chunk_sizes_equal_alone(served_tiny, seed):
    model, tok = served_tiny
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    reqs = targets(rng, vocab)
    reference = alone(model, tok, reqs)
    chunk = rng.choice([7, 16, 33, 256])
    got = in_batch(model, tok, reqs, others(rng, rng.randint(1, 30), vocab), rng, max_num_batched_tokens=chunk)
    assert got == reference, f"batch with chunk size {chunk} changed a request"


def test_prefix_cache_hit_gives_the_same_tokens(served_tiny):
    model, tok = served_tiny
    rng = random.Random(11)
    reqs = targets(rng, model.config.vocab_size)
    reference = alone(model, tok, reqs, enable_prefix_caching=False)
    eng = make_engine(model, tok)
    try:
        first = [fingerprint(run_all(eng, [r])[0]) for r in reqs]
        again = run_all(eng, reqs)
        assert all(o[-1].num_cached_tokens >= 16 for o in again)  # the second time the prefix came from the cache
        assert first == reference and [fingerprint(o) for o in again] == reference
    finally:
        eng.shutdown()


def test_preemption_and_recompute_give_the_same_tokens(served_tiny):
    model, tok = served_tiny
    cfg = model.config
    rng = random.Random(5)
    reqs = targets(rng, cfg.vocab_size)
    reference = alone(model, tok, reqs)
    block_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * 16
    eng = make_engine(model, tok, kv_cache_memory=20 * block_bytes, max_model_len=160)
    try:
        batch = reqs + others(rng, 24, cfg.vocab_size)
        outs = run_all(eng, batch)
        assert eng.scheduler.num_preemptions > 0
        assert [fingerprint(outs[i]) for i in range(len(reqs))] == reference
    finally:
        eng.shutdown()


def test_thread_count_and_a_second_engine_give_the_same_tokens(served_tiny):
    model, tok = served_tiny
    rng = random.Random(3)
    reqs = targets(rng, model.config.vocab_size)
    reference = alone(model, tok, reqs, num_threads=2)
    assert alone(model, tok, reqs, num_threads=1) == reference
    assert in_batch(model, tok, reqs, others(rng, 8, model.config.vocab_size), rng, num_threads=1) == reference


@pytest.mark.slow
def test_smollm2_chat_prompts_alone_equal_together(smollm2_gguf_path):
    """SmolLM2 as `kvserve serve` ships it: 6 chat prompts, greedy and seeded, alone vs all at once."""
    model, tok = load_model(smollm2_gguf_path, dtype=torch.float32, quantization="auto", attention="auto", progress=False)
    assert model.attention == "kernel" and model.weights.startswith("q4q8"), (model.attention, model.weights)
    questions = ["Name three primary colours.", "What is the capital of France?", "Write a haiku about rain.",
                 "Explain recursion in one sentence.", "What is 12 times 7?", "Give me a tip for sleeping well."]
    reqs = []
    for i, q in enumerate(questions):
        prompt = tok.encode_chat([{"role": "user", "content": q}])
        params = (SamplingParams(max_tokens=16, temperature=0, logprobs=1) if i % 2 == 0 else
                  SamplingParams(max_tokens=16, temperature=0.9, seed=7, logprobs=1))
        reqs.append((prompt, params))
    reference = alone(model, tok, reqs, kv_cache_memory=64 << 20)
    together = in_batch(model, tok, reqs, [], random.Random(0), kv_cache_memory=64 << 20, max_num_batched_tokens=64)
    assert together == reference
