"""The grammar compile budget on the tiny model's vocabulary, through GrammarCompiler: a spec over the
time budget is refused after it and its compile process is gone; a small spec next to two slow ones
compiles at once; a cancelled caller kills its compile; equal specs share one compile; a full set of
workers refuses more; and close() leaves no process behind. The slow spec (tests.service.hostile_schemas)
compiles for minutes and passes every cheap check.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from model.sampling_params import StructuredOutput
from service.engine import RequestError
from service.engine.grammar_workers import CompileBudget, CompilerBusyError
from service.engine.structured_output import GrammarCompiler
from tests.service.hostile_schemas import slow_schema
from tests.service.live_server import wait_until
from tests.service.processes import alive, children


def slow_spec(tag: str) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(slow_schema(tag)))


SMALL = StructuredOutput("json", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))


@pytest.fixture
def compiler(tiny):
    """A GrammarCompiler whose zygote has started (one small compile); closed, and checked gone, after."""
    model, tok = tiny
    made = []

    def make(**budget) -> GrammarCompiler:
        grammars = GrammarCompiler(tok, model.config.vocab_size, budget=CompileBudget(**budget))
        asyncio.run(grammars.matcher(SMALL))  # the zygote starts (seconds), outside any timing below
        made.append((grammars, grammars.workers.pid))
        return grammars

    yield make
    for grammars, pid in made:
        grammars.close()
        assert not alive(pid), "the zygote outlived close()"


def compiling(grammars: GrammarCompiler) -> list[int]:
    return children(grammars.workers.pid)


@pytest.mark.timeout(120)
def test_a_spec_over_the_budget_is_refused_and_its_process_is_gone(compiler):
    grammars = compiler(timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RequestError, match=r"too complex to compile within 1s \(--grammar-compile-timeout\)") as info:
        asyncio.run(grammars.matcher(slow_spec("t")))
    assert info.value.param == "structured_output"
    assert time.monotonic() - started < 30  # the budget plus scheduling on a busy machine, not minutes
    assert compiling(grammars) == []  # answered only once the child was reaped
    assert grammars.workers.outcomes["timeout"] == 1


@pytest.mark.timeout(120)
def test_a_small_spec_compiles_while_two_slow_ones_run(compiler):
    grammars = compiler(timeout=60.0)

    async def scenario() -> float:
        slow = [asyncio.ensure_future(grammars.matcher(slow_spec(str(i)))) for i in range(2)]
        while len(compiling(grammars)) < 2:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        await grammars.matcher(StructuredOutput("regex", "[a-z]{1,8}"))
        took = time.monotonic() - started
        assert all(not f.done() for f in slow)  # still compiling: the small one did not wait for them
        for f in slow:
            f.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        return took

    took = asyncio.run(scenario())
    assert took < 20, took  # a generous bound on a shared 2-core machine; unbounded before (minutes)
    wait_until(lambda: compiling(grammars) == [], "cancelled compiles were not killed", timeout=10)
    assert grammars.workers.outcomes["cancelled"] == 2


@pytest.mark.timeout(120)
def test_cancelling_the_caller_kills_its_compile_and_equal_specs_share_one(compiler):
    grammars = compiler(timeout=60.0)
    spec = slow_spec("shared")

    async def scenario() -> None:
        waiters = [asyncio.ensure_future(grammars.matcher(spec)) for _ in range(3)]
        while not compiling(grammars):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert len(compiling(grammars)) == 1  # three requests, one compile
        waiters[0].cancel()
        await asyncio.sleep(0.3)
        assert len(compiling(grammars)) == 1  # two still wait for it
        for w in waiters[1:]:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    asyncio.run(scenario())
    wait_until(lambda: compiling(grammars) == [], "the last waiter left, the compile went on", timeout=10)
    assert grammars.workers.outcomes["cancelled"] == 1 and grammars.workers.in_flight == 0


@pytest.mark.timeout(120)
def test_full_workers_refuse_more_and_close_ends_everything(compiler):
    grammars = compiler(timeout=60.0, workers=1)

    async def scenario() -> None:
        running = asyncio.ensure_future(grammars.matcher(slow_spec("run")))
        waiting = asyncio.ensure_future(grammars.matcher(slow_spec("wait")))
        while not compiling(grammars):
            await asyncio.sleep(0.02)
        with pytest.raises(CompilerBusyError, match="--grammar-compile-workers"):
            await grammars.matcher(slow_spec("refused"))
        grammars.close()  # what the engine does at shutdown: both callers are answered
        results = await asyncio.gather(running, waiting, return_exceptions=True)
        assert all(isinstance(r, Exception) and not isinstance(r, RequestError) for r in results), results

    zygote = grammars.workers.pid
    kids = compiling(grammars)
    asyncio.run(scenario())
    assert not alive(zygote) and not any(alive(pid) for pid in kids)


@pytest.mark.timeout(120)
def test_a_compile_over_its_memory_cap_is_refused(compiler):
    grammars = compiler(timeout=60.0, memory=16 << 20)
    many = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^x{i}[a-z]{{1,40}}$"}
                                             for i in range(1000)}}
    with pytest.raises(RequestError, match=r"16 MiB") as info:
        asyncio.run(grammars.matcher(StructuredOutput("json", json.dumps(many))))
    assert info.value.param == "structured_output"
    assert compiling(grammars) == []
    asyncio.run(grammars.matcher(SMALL))  # the zygote itself is fine
