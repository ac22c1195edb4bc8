"""Engine vs one-request-at-a-time references: continuous batching must not change greedy tokens."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from model.sampling_params import SamplingParams
from service.engine.errors import QueueFullError, RequestError
from tests.service.engine.engine_helpers import make_engine, reference_greedy, run_all, text_of, tokens_of


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 80, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        body = [rng.randrange(3, 259) for _ in range(rng.randint(lo, hi))]
        prompts.append((prefix or []) + body if prefix and i % 2 == 0 else body)
    return prompts


def check_against_reference(model, outputs_per_request, prompts, max_tokens):
    for prompt, outputs in zip(prompts, outputs_per_request):
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
        assert tokens_of(outputs) == reference_greedy(model, prompt, max_tokens)


def check_batched_equals_one_at_a_time(model, tok, n: int, max_tokens: int, seed: int) -> None:
    engine = make_engine(model, tok, max_num_batched_tokens=64)  # chunked prefill of the longer prompts
    prompts = random_prompts(n, seed=seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = run_all(engine, [(p, params) for p in prompts])
    check_against_reference(model, outs, prompts, max_tokens)
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


@pytest.mark.parametrize("attention", ["flash", "sdpa", "naive"])
def test_32_concurrent_greedy_requests_match_one_at_a_time(tiny, attention):
    model, tok = tiny
    model.set_attention(attention)
    try:
        check_batched_equals_one_at_a_time(model, tok, 32, 10, seed=0)
    finally:
        model.set_attention("flash")


def test_preemption_under_a_tiny_kv_budget_keeps_tokens_exact(tiny):
    model, tok = tiny
    cfg = model.config
    bytes_per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * 16
    engine = make_engine(model, tok, kv_cache_memory=12 * bytes_per_block, max_model_len=160)
    prompts = random_prompts(32, seed=1, lo=20, hi=60)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = run_all(engine, [(p, params) for p in prompts])
    check_against_reference(model, outs, prompts, 24)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


def test_shared_prefix_hits_the_prefix_cache_and_keeps_tokens_exact(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    prefix = random_prompts(1, seed=99, lo=48, hi=48)[0]
    prompts = random_prompts(32, seed=2, lo=3, hi=30, prefix=prefix)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = run_all(engine, [(prompts[0], params)])  # warm the cache with one prefixed prompt
    outs = run_all(engine, [(p, params) for p in prompts])
    check_against_reference(model, first + outs, [prompts[0]] + prompts, 8)
    stats = engine.stats().kv
    assert stats.prefix_hits_tokens >= 16 * 48 // 16 * 16
    assert any(o[-1].num_cached_tokens >= 48 for o in outs)
    assert stats.used_blocks == 0 and stats.cached_blocks > 0
    engine.shutdown()


def test_eos_stops_a_request(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    prompt = random_prompts(1, seed=3)[0]
    reference = reference_greedy(model, prompt, 6)
    stop_id = reference[3]
    outs = run_all(engine, [(prompt, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(stop_id,)))])[0]
    assert tokens_of(outs) == reference[:reference.index(stop_id) + 1]
    assert outs[-1].finish_reason == "stop"
    engine.shutdown()


def test_seeds_reproduce_whatever_else_is_in_the_batch(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    prompt = random_prompts(1, seed=4)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = tokens_of(run_all(engine, [(prompt, seeded)])[0])
    others = [(p, SamplingParams(max_tokens=12, temperature=1.0)) for p in random_prompts(7, seed=5)]
    crowded = run_all(engine, others[:3] + [(prompt, seeded)] + others[3:])
    assert tokens_of(crowded[3]) == alone
    other_seed = tokens_of(run_all(engine, [(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99))])[0])
    assert other_seed != alone
    engine.shutdown()


def test_stop_string_cuts_the_text_and_matches_across_tokens(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    prompts = random_prompts(6, seed=6)
    for prompt in prompts:
        full = run_all(engine, [(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))])[0]
        text = text_of(full)
        if len(text) < 6:
            continue
        stop = text[2:5]  # spans several byte tokens, and often several characters
        cut = run_all(engine, [(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop,)))])[0]
        assert text_of(cut) == text[:text.index(stop)]
        assert cut[-1].finish_reason == "stop"
        streamed = ""
        for out in cut:  # nothing of the stop string was ever streamed
            streamed += out.new_text
            assert stop not in streamed
    engine.shutdown()


def test_abort_frees_every_block(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    prompt = random_prompts(1, seed=7, lo=70, hi=70)[0]

    async def main():
        gen = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "long")
        first = await gen.__anext__()
        assert engine.stats().kv.used_blocks > 0 or first.finished
        await gen.aclose()  # the caller goes away: the engine aborts the request

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert engine.num_unfinished == 0
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


def test_explicit_abort_reports_abort(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)

    async def main():
        outs = []
        async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=300, temperature=0, ignore_eos=True), "a"):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("a")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort" and len(outs) < 300
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


BAD_PROMPT = [250, 251, 252, 253, 254, 255, 256]


def inject(engine, monkeypatch, where: str) -> None:
    """Make the request with BAD_PROMPT break at `where`, whatever else shares its step."""
    runner, sampler, outputs = engine.runner.execute, engine.sampler.sample, engine.outputs.on_token

    def forward(scheduled):
        if any(s.request.prompt_token_ids == BAD_PROMPT for s in scheduled):
            raise RuntimeError("injected forward failure")
        return runner(scheduled)

    def nan_logits(scheduled):  # the model emits NaN for the bad request's row only
        logits = runner(scheduled).clone()  # an inference tensor cannot be written outside inference mode
        rows = [s for s in scheduled if s.samples]
        for i, s in enumerate(rows):
            if s.request.prompt_token_ids == BAD_PROMPT:
                logits[i] = float("nan")
        return logits

    def sample(logits, params, prompt_ids, *rest):
        if BAD_PROMPT in prompt_ids:
            raise RuntimeError("injected sampling failure")
        return sampler(logits, params, prompt_ids, *rest)

    def on_token(req, *args):
        if req.prompt_token_ids == BAD_PROMPT:
            raise RuntimeError("injected output failure")
        return outputs(req, *args)

    if where == "forward":
        monkeypatch.setattr(engine.runner, "execute", forward)
    elif where == "nan-logits":
        monkeypatch.setattr(engine.runner, "execute", nan_logits)
    elif where == "sample":
        monkeypatch.setattr(engine.sampler, "sample", sample)
    elif where == "output":
        monkeypatch.setattr(engine.outputs, "on_token", on_token)


@pytest.mark.parametrize("where", ["forward", "nan-logits", "sample", "output", "overflowing-penalty"])
def test_a_request_that_breaks_fails_alone_and_the_others_are_unchanged(tiny, monkeypatch, where):
    model, tok = tiny
    engine = make_engine(model, tok)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, stop=("zz",))
    healthy = [([10, 11, 12], greedy), ([40] * 20, seeded), ([13, 14], greedy), ([99, 98, 97, 96], greedy)]
    alone = run_all(engine, healthy)
    inject(engine, monkeypatch, where)
    # the case: a penalty of 1e-44 divides the seen tokens' logits past float32's range
    bad = SamplingParams(max_tokens=4, temperature=1.0, repetition_penalty=1e-44, ignore_eos=True) \
        if where == "overflowing-penalty" else SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = run_all(engine, healthy[:2] + [(BAD_PROMPT, bad)] + healthy[2:])
    broken = outs.pop(2)
    if where == "overflowing-penalty":  # its logits are repaired, so it runs to the end
        assert broken[-1].finish_reason == "length" and len(tokens_of(broken)) == 4
    else:
        assert broken[-1].finish_reason == "error" and broken[-1].error
        assert "injected" in broken[-1].error or "finite" in broken[-1].error
    for got, want in zip(outs, alone):
        assert tokens_of(got) == tokens_of(want) and text_of(got) == text_of(want)
        assert got[-1].finish_reason == "length"
    assert engine.stats().kv.used_blocks == 0 and engine.num_unfinished == 0
    monkeypatch.undo()
    again = run_all(engine, [(BAD_PROMPT, greedy)])[0]  # the engine keeps serving, the bad prompt too
    assert tokens_of(again) == reference_greedy(model, BAD_PROMPT, 6)
    engine.shutdown()


def test_a_forward_that_fails_for_everyone_fails_them_with_a_clear_error_and_the_engine_recovers(tiny, monkeypatch):
    model, tok = tiny
    engine = make_engine(model, tok)
    real = engine.runner.execute
    calls = {"n": 0}

    def broken(scheduled):
        calls["n"] += 1
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine.runner, "execute", broken)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    failed = run_all(engine, [([10, 11, 12], params), ([13, 14], params)])
    for outs in failed:
        assert outs[-1].finish_reason == "error" and "injected failure" in outs[-1].error
    assert calls["n"] >= 3  # the batch, then each request alone
    monkeypatch.setattr(engine.runner, "execute", real)
    again = run_all(engine, [([10, 11, 12], params)])[0]
    assert tokens_of(again) == reference_greedy(model, [10, 11, 12], 4)
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


def test_requests_that_can_never_fit_are_refused_at_submission(tiny):
    model, tok = tiny
    engine = make_engine(model, tok, max_model_len=64)
    with pytest.raises(RequestError, match="max_tokens=60"):
        run_all(engine, [([5] * 10, SamplingParams(max_tokens=60))])
    with pytest.raises(RequestError, match="prompt has 64 tokens"):
        run_all(engine, [([5] * 64, SamplingParams(max_tokens=1))])
    with pytest.raises(RequestError, match="empty"):
        run_all(engine, [([], SamplingParams(max_tokens=1))])
    engine.shutdown()


def test_max_model_len_beyond_the_kv_capacity_is_refused_at_start(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="capacity of"):
        make_engine(model, tok, kv_cache_memory=1 << 16, max_model_len=4096)


@pytest.mark.parametrize("max_num_seqs,max_queue", [(1, 0), (2, 0), (2, 3)])
def test_max_queue_counts_only_what_must_wait(tiny, max_num_seqs, max_queue):
    # a burst: max_num_seqs requests can run at once, max_queue more may wait, the rest are refused
    model, tok = tiny
    engine = make_engine(model, tok, max_num_seqs=max_num_seqs, max_queue=max_queue)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    async def burst():
        gens = [engine.generate([5, 6, i], params, f"r{i}") for i in range(max_num_seqs + max_queue + 2)]
        results = await asyncio.gather(*(gen.__anext__() for gen in gens), return_exceptions=True)
        for gen in gens:
            await gen.aclose()
        return results

    results = asyncio.run(burst())
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert (len(served), len(refused)) == (max_num_seqs + max_queue, 2)
    assert f"{max_num_seqs} run at once" in str(refused[0]) and f"{max_queue} may wait" in str(refused[0])
    deadline = time.monotonic() + 30
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tokens_of(run_all(engine, [([5, 6], params)])[0]) == reference_greedy(model, [5, 6], 3)  # served again
    engine.shutdown()


def test_timeout_ends_a_request_and_frees_its_blocks(tiny, monkeypatch):
    model, tok = tiny
    engine = make_engine(model, tok, request_timeout=0.5)
    real = engine.runner.execute

    def slow(scheduled):  # 20 ms a step: 200 tokens cannot finish inside the timeout
        time.sleep(0.02)
        return real(scheduled)

    monkeypatch.setattr(engine.runner, "execute", slow)
    outs = run_all(engine, [([8] * 10, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))])[0]
    assert outs[-1].finish_reason == "timeout"
    assert 0 < outs[-1].completion_tokens < 200 and outs[-1].error is None
    assert engine.stats().kv.used_blocks == 0
    engine.shutdown()


@pytest.mark.parametrize("quantization", ["q4", "int8", "fp16"])
def test_quantized_weights_keep_batched_greedy_tokens_equal_to_one_at_a_time(quantization):
    # the q4 / int8 kernels compute each row alone (bit-identical at any batch size, measured), so
    # batching cannot change a quantized model's tokens either; the reference is the same model's
    # no-cache forward
    from model.loader import load_model
    model, tok = load_model("tiny", dtype="float32", quantization=quantization, progress=False)
    check_batched_equals_one_at_a_time(model, tok, 16, 8, seed=3)
