"""What a real tiny engine reports while it runs: token counters move every step (a request's
tokens are counted before it finishes), per-request histograms when it finishes, and each engine
thread runs with its own torch thread count.

The mid-request check is exact, not timed: the observer (the real metrics observer) holds the
engine thread after a chosen step until the test has scraped the registry.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model.config import PRESETS
from model.sampling_params import SamplingParams
from model.tokenizer import byte_tokenizer
from model.transformer import random_transformer
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.observer import EngineObserver
from service.metrics import ServerMetrics, VariantObserver

WAIT_S = 60  # a guard against a hung engine, not a timing assertion


@pytest.fixture(scope="module")
def tiny():
    return random_transformer(PRESETS["tiny"], seed=1), byte_tokenizer()


class HeldObserver(VariantObserver):
    """The server's observer, which stops the engine thread after step `hold_at` until released."""

    def __init__(self, metrics: ServerMetrics, variant: str, hold_at: int):
        super().__init__(metrics, variant)
        self.hold_at, self.steps = hold_at, 0
        self.held, self.release = threading.Event(), threading.Event()

    def on_tokens(self, *, prompt_tokens: int, generation_tokens: int) -> None:
        super().on_tokens(prompt_tokens=prompt_tokens, generation_tokens=generation_tokens)
        self.steps += 1
        if self.steps == self.hold_at:
            self.held.set()
            self.release.wait(WAIT_S)


def scrape(metrics: ServerMetrics) -> dict[str, float]:
    """{sample name with its non-constant labels: value} of one scrape, for variant "native"."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.labels.get("variant") == "native":
                extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("variant", "model_name"))
                out[s.name + (f"{{{extra}}}" if extra else "")] = s.value
    return out


def test_token_counters_move_every_step_and_histograms_at_the_finish(tiny):
    model, tokenizer = tiny
    metrics = ServerMetrics("tiny")
    observer = HeldObserver(metrics, "native", hold_at=5)
    metrics.observers["native"] = observer
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_memory=1 << 20, num_threads=1), observer=observer)
    engine.start()
    prompt = tokenizer.encode("count my tokens as they come", add_special_tokens=True)
    max_tokens = 40

    async def run():
        async def collect():
            return [out async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), "r")]
        task = asyncio.ensure_future(collect())
        assert await asyncio.to_thread(observer.held.wait, WAIT_S), "the engine never reached step 5"
        during = scrape(metrics)
        observer.release.set()
        return during, await task

    try:
        during, outputs = asyncio.run(run())
    finally:
        observer.release.set()
        engine.shutdown(timeout=30)
    # step 1 prefilled the prompt and sampled the first token; steps 2-5 one token each
    assert during["kvserve_prompt_tokens_total"] == len(prompt)
    assert during["kvserve_generation_tokens_total"] == 5
    assert during["kvserve_requests_finished_total{finish_reason=length}"] == 0
    assert during["kvserve_request_generation_tokens_count"] == 0
    assert during["kvserve_e2e_request_latency_seconds_count"] == 0
    after = scrape(metrics)
    assert outputs[-1].finished and outputs[-1].completion_tokens == max_tokens
    assert after["kvserve_prompt_tokens_total"] == len(prompt)
    assert after["kvserve_generation_tokens_total"] == max_tokens
    assert after["kvserve_requests_finished_total{finish_reason=length}"] == 1
    assert after["kvserve_request_generation_tokens_sum"] == max_tokens
    assert after["kvserve_request_prompt_tokens_sum"] == len(prompt)
    assert (observer.prompt_tokens_total, observer.generation_tokens_total) == (len(prompt), max_tokens)


class ThreadCountObserver(EngineObserver):
    """Records torch's thread count as the engine thread sees it (observers run on that thread)."""

    def __init__(self):
        self.seen: set[int] = set()

    def on_step(self, **_) -> None:
        self.seen.add(torch.get_num_threads())


def test_each_engine_thread_runs_with_its_own_thread_count(tiny):
    model, tokenizer = tiny
    main_threads = torch.get_num_threads()
    wanted = {"a": main_threads + 1, "b": main_threads + 2}  # differ from the caller's and from each other
    observers = {name: ThreadCountObserver() for name in wanted}
    # single_thread_tokens=0: every step on the engine's own count (small steps on one thread are
    # tested in test_step_threads.py)
    engines = [Engine(model, tokenizer, EngineConfig(kv_cache_memory=1 << 20, num_threads=n, single_thread_tokens=0),
                      name=name, observer=observers[name]) for name, n in wanted.items()]
    for engine in engines:
        engine.start()

    async def drain(engine: Engine) -> None:
        async for _ in engine.generate([5, 6, 7], SamplingParams(max_tokens=4), f"r-{engine.name}"):
            pass

    async def run():
        await asyncio.gather(*(drain(e) for e in engines))
    try:
        asyncio.run(run())
    finally:
        for engine in engines:
            engine.shutdown(timeout=30)
    assert {name: obs.seen for name, obs in observers.items()} == {name: {n} for name, n in wanted.items()}
    assert torch.get_num_threads() == main_threads
