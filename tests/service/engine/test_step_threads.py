"""Small steps on one thread: the measured crossover, and the engine switching threads by step size."""
from __future__ import annotations

import threading

import pytest
import torch

from kvcache.kv_cache import KVCache, KVLayout
from model.sampling_params import SamplingParams
from service.engine import step_threads
from tests.service.engine.engine_helpers import make_engine, reference_greedy, run_all, tokens_of


def test_the_crossover_is_the_largest_batch_up_to_which_one_thread_always_won(tiny, monkeypatch):
    model, tok = tiny
    engine = make_engine(model, tok)
    seconds = {(1, 1): 1.0, (1, 2): 2.0, (2, 1): 1.0, (2, 2): 1.5, (4, 1): 3.0, (4, 2): 2.0, (8, 1): 1.0, (8, 2): 9.0}
    monkeypatch.setattr(step_threads, "_step_seconds", lambda m, kv, tokens, threads, repeats: seconds[tokens, threads])
    # 8 tokens would win again, but 4 lost first: the line is drawn at 2
    assert step_threads.measure_single_thread_tokens(model, engine.kv_cache, 2) == 2
    assert step_threads.measure_single_thread_tokens(model, engine.kv_cache, 1) == 0  # nothing to save
    engine.shutdown()


@pytest.mark.parametrize("blocks, tokens, context", [(4096, 32, 256), (9, 4, 32), (9, 8, 16), (9, 16, 0)])
def test_probed_steps_have_a_served_steps_context_where_the_blocks_allow(tiny, monkeypatch, blocks, tokens, context):
    model, _ = tiny
    cfg = model.config
    cache = KVCache(KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 4, 16), blocks, torch.float32, "cpu")
    assert step_threads.probe_context(model, cache, tokens) == min(context, cfg.max_seq_len)
    if context:
        seen = []
        real = step_threads.PagedMetadata.build
        monkeypatch.setattr(step_threads.PagedMetadata, "build", lambda **kw: (seen.append(kw), real(**kw))[1])
        step_threads._step_seconds(model, cache, tokens, 1, repeats=1)
        lens, tables = seen[0]["context_lens"], seen[0]["block_tables"]
        assert lens == [context] * tokens
        used = [b for table in tables for b in table]
        assert len(used) == tokens * (-(-context // 16))
        assert len(set(used)) == len(used) and 0 not in used and max(used) < blocks  # own scratch pages


def test_the_real_measurement_leaves_the_thread_count_as_it_was(tiny):
    model, tok = tiny
    engine = make_engine(model, tok)
    before = torch.get_num_threads()
    try:
        result = step_threads.measure_single_thread_tokens(model, engine.kv_cache, 2, repeats=1)
        assert result in (0, *step_threads.PROBE_TOKENS)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        engine.shutdown()


@pytest.mark.parametrize("single", [0, 3])
def test_the_engine_runs_small_steps_on_one_thread_and_keeps_its_tokens(tiny, monkeypatch, single):
    model, tok = tiny
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    engine = make_engine(model, tok, num_threads=2, single_thread_tokens=single)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = run_all(engine, [(p, params) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert tokens_of(out) == reference_greedy(model, prompt, 6)
    engine.shutdown()
    # the prefill step (10 tokens) runs on 2 threads; the decode steps of 3 sequences on 1 when allowed
    assert (1 in calls) == (single >= 3)
    real(2)


def test_an_engine_runs_on_its_builders_threads_after_another_engine_ran_one_thread_steps(tiny, monkeypatch):
    """torch hands a new thread the count any thread set last: an engine that ran one-thread steps
    must not leave the next engine (num_threads unset) on one thread for everything."""
    model, tok = tiny
    before = torch.get_num_threads()
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        torch.set_num_threads(2)
        first = make_engine(model, tok, num_threads=2, single_thread_tokens=1_000_000)  # every step on 1 thread
        run_all(first, [([5, 6, 7], params)])
        first.shutdown()
        seen: list[int] = []  # the thread count of each forward on an engine thread
        real_forward = type(model).forward

        def forward(self, *args, **kwargs):
            if threading.current_thread().name.startswith("kvserve-engine"):
                seen.append(torch.get_num_threads())
            return real_forward(self, *args, **kwargs)
        monkeypatch.setattr(type(model), "forward", forward)
        second = make_engine(model, tok, single_thread_tokens=0)  # num_threads unset: the builder's 2
        outs = run_all(second, [([5, 6, 7, 8], params)])
        second.shutdown()
        assert tokens_of(outs[0]) == reference_greedy(model, [5, 6, 7, 8], 3)
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(before)
