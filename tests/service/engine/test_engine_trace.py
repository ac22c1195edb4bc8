"""The engine step by step, under a tight KV budget and a small token budget, and the metrics it
reports, read from the server's real /metrics exposition (no Prometheus needed).

Each step the scheduler hands out is recorded, then checked against what the scheduler promises:
every step within max_num_batched_tokens; a long prompt prefilled in chunks while the others keep
decoding; on a shortage, the most recently admitted request is the one preempted; a preempted
request, admitted again, finds its own blocks in the prefix cache. The counters on /metrics must
equal what the trace shows (preemptions) and what the prompts were built to share (prefix hits).
Each of these once had a mutant the suite did not notice; these tests catch it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcache.kv_cache import KVLayout
from model.sampling_params import SamplingParams
from service.engine.config import EngineConfig
from service.server import ServeOptions, build_state, stop_engines
from tests.service.engine.engine_helpers import reference_greedy, run_all, tokens_of

BLOCK = 16
BUDGET = 48  # tokens per step


@dataclass
class Step:
    scheduled: list[tuple[str, int, int, int]]  # (request id, computed before, new tokens, prompt tokens)
    preempted: list[str]
    admitted: list[tuple[str, int]]             # (request id, tokens found in the prefix cache)
    running_before: list[str]                   # admission order of the running batch before the step


def record_steps(engine) -> list[Step]:
    """Wrap the engine's scheduler so every step's decisions are kept (the engine thread calls it)."""
    steps: list[Step] = []
    scheduler, real = engine.scheduler, engine.scheduler.schedule

    def schedule():
        before = [r.request_id for r in scheduler.running]
        out = real()
        steps.append(Step(
            scheduled=[(s.request.request_id, s.request.num_computed_tokens, s.num_new_tokens,
                        s.request.num_prompt_tokens) for s in out.scheduled],
            preempted=[r.request_id for r in out.preempted],
            admitted=[(r.request_id, r.num_computed_tokens) for r in out.admitted],
            running_before=before))
        return out

    scheduler.schedule = schedule
    return steps


def scrape(state) -> dict[str, float]:
    """/metrics as the server renders it: sample name -> value, for the variant `native`."""
    text = state.metrics.render().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.labels.get("variant") == "native" and len(s.labels) - ("model_name" in s.labels) == 1}


@pytest.fixture
def state(tiny):
    model, _ = tiny
    layout = KVLayout(model.config.n_layers, model.config.n_kv_heads, model.config.head_dim, 4, BLOCK)
    config = EngineConfig(kv_cache_memory=12 * layout.bytes_per_block, block_size=BLOCK, max_model_len=160,
                          max_num_seqs=8, max_num_batched_tokens=BUDGET)
    state = build_state(ServeOptions(model="tiny", dtype="float32", engine=config))
    for engine in state.engines.values():
        engine.start()
    yield state
    stop_engines(state)


def test_step_trace_under_pressure_and_the_metrics_it_reports(state, tiny):
    model, _ = tiny
    engine = state.engines["native"]
    assert engine.kv_manager.num_blocks == 12
    steps = record_steps(engine)
    rng = random.Random(5)
    long_prompt = [rng.randrange(3, 259) for _ in range(120)]       # 3 chunks of the 48-token budget
    short = [[rng.randrange(3, 259) for _ in range(rng.randint(20, 40))] for _ in range(4)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    requests = [(p, params) for p in short[:2]] + [(long_prompt, SamplingParams(max_tokens=8, temperature=0,
                                                                                 ignore_eos=True))]
    requests += [(p, params) for p in short[2:]]
    outs = run_all(engine, requests)
    for (prompt, sp), got in zip(requests, outs):
        assert tokens_of(got) == reference_greedy(model, prompt, sp.max_tokens)
    ids = [f"req-{i}" for i in range(len(requests))]
    long_id = ids[2]

    # every step within the token budget
    assert steps and all(sum(n for _, _, n, _ in s.scheduled) <= BUDGET for s in steps)
    # the long prompt is prefilled in chunks, in steps where another request decodes
    chunks = [(s, c, n) for s in steps for rid, c, n, p in s.scheduled if rid == long_id and c + n < p]
    assert len(chunks) >= 2, "the 120-token prompt was never split over steps"
    assert any(any(c >= p for rid, c, _, p in s.scheduled if rid != long_id) for s, _, _ in chunks), \
        "no request decoded while the long prompt was being prefilled"
    # a shortage preempts the most recently admitted running request
    preemptions = [(s, victim) for s in steps for victim in s.preempted]
    assert preemptions, "12 blocks for 5 requests of up to 128 tokens never ran short"
    for s, victim in preemptions:
        assert victim == s.running_before[-1 - s.preempted.index(victim)], (victim, s.running_before)
    # a preempted request admitted again finds its own blocks, left in the prefix cache, and computes less
    readmitted = [(rid, hit) for s in steps for rid, hit in s.admitted if any(v == rid for _, v in preemptions)]
    assert readmitted and any(hit >= BLOCK for _, hit in readmitted), readmitted
    assert engine.stats().kv.used_blocks == 0

    # the metrics: preemptions as the trace shows them; prefix queries and hits as each admission found them
    m = scrape(state)
    assert m["kvserve_preemptions_total"] == len(preemptions) == engine.scheduler.num_preemptions
    admissions = [(rid, hit) for s in steps for rid, hit in s.admitted]
    assert m["kvserve_prefix_cache_hits_total"] == sum(hit for _, hit in admissions) > 0


def test_prefix_hits_on_metrics_and_in_each_answer_are_what_the_prompts_share(state):
    engine = state.engines["native"]
    rng = random.Random(6)
    shared = [rng.randrange(3, 259) for _ in range(64)]
    a = shared + [rng.randrange(3, 259) for _ in range(5)]   # 69 tokens: 4 full blocks
    b = shared + [rng.randrange(3, 259) for _ in range(7)]   # shares a's first 4 blocks: 64 tokens
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    before = scrape(state)
    first = run_all(engine, [(a, params)])[0]
    second = run_all(engine, [(b, params)])[0]
    again = run_all(engine, [(a, params)])[0]   # all of a's 4 full blocks; its 5-token tail is computed
    assert [o[-1].num_cached_tokens for o in (first, second, again)] == [0, 64, 64]
    after = scrape(state)
    assert after["kvserve_prefix_cache_hits_total"] - before["kvserve_prefix_cache_hits_total"] == 128
    assert after["kvserve_prefix_cache_queries_total"] - before["kvserve_prefix_cache_queries_total"] == 69 + 71 + 69
    assert after["kvserve_preemptions_total"] == before["kvserve_preemptions_total"]
