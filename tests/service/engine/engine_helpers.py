"""Shared pieces of the engine tests: running many requests at once, and the one-at-a-time reference."""
from __future__ import annotations

import asyncio

from model.sampling_params import SamplingParams
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from tests.reference import greedy_no_cache


def reference_greedy(model, prompt: list[int], max_tokens: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens of one request through the no-cache forward, recomputing everything each token."""
    return greedy_no_cache(model, prompt, max_tokens, stop_ids=stop_ids)[0]


async def collect(engine: Engine, prompt: list[int], params: SamplingParams, request_id: str):
    """All outputs of one request, in order."""
    return [out async for out in engine.generate(prompt, params, request_id)]


def run_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]):
    """Submit every request at once; returns the list of outputs per request."""
    async def main():
        return await asyncio.gather(*(collect(engine, p, sp, f"req-{i}") for i, (p, sp) in enumerate(requests)))
    return asyncio.run(main())


def tokens_of(outputs) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def text_of(outputs) -> str:
    return "".join(out.new_text for out in outputs)


def make_engine(model, tokenizer, **overrides) -> Engine:
    cfg = dict(kv_cache_memory=4 << 20, block_size=16, max_num_seqs=64, max_num_batched_tokens=256)
    cfg.update(overrides)
    engine = Engine(model, tokenizer, EngineConfig(**cfg))
    engine.start()
    return engine
