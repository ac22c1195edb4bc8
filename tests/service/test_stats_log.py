"""The periodic stats line, one call at a time on a real tiny engine: nothing while idle, one line per
busy variant with its tokens/s over the interval, nothing again once it is idle."""
from __future__ import annotations

import asyncio
import logging

from model.config import PRESETS
from model.sampling_params import SamplingParams
from model.tokenizer import byte_tokenizer
from model.transformer import random_transformer
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.metrics import ServerMetrics
from service.stats_log import StatsLogger


def test_a_line_per_busy_interval_and_none_while_idle(caplog):
    model, tokenizer = random_transformer(PRESETS["tiny"], seed=1), byte_tokenizer()
    metrics = ServerMetrics("tiny")
    engines = {v: Engine(model, tokenizer, EngineConfig(kv_cache_memory=1 << 20, num_threads=1), name=v,
                         observer=metrics.observer(v)) for v in ("native", "mqa")}
    for engine in engines.values():
        engine.start()
    stats = StatsLogger(engines, metrics, interval_s=60)  # log_once() is called by hand here
    stats.start()

    async def generate(n: int):
        async for _ in engines["native"].generate([5, 6, 7, 8], SamplingParams(max_tokens=n, ignore_eos=True), f"r{n}"):
            pass

    try:
        with caplog.at_level(logging.INFO, logger="kvserve.stats"):
            stats.log_once()
            assert caplog.records == []
            asyncio.run(generate(9))
            stats.log_once()
            (line,) = caplog.records  # mqa did nothing: no line for it
            stats.log_once()
            assert len(caplog.records) == 1
    finally:
        stats.stop()
        for engine in engines.values():
            engine.shutdown(timeout=30)
    assert line.levelno == logging.INFO and line.variant == "native"
    assert (line.running, line.waiting, line.preemptions) == (0, 0, 0)
    assert line.generation_tokens_per_s > 0 and line.prompt_tokens_per_s > 0
    assert line.kv_blocks_used + line.kv_blocks_cached + line.kv_blocks_free == engines["native"].stats().kv.num_blocks
    assert line.getMessage().startswith("variant native: running 0, waiting 0, KV usage 0.0%")
