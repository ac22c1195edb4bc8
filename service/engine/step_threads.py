"""How many threads a step runs on: one for small steps where that is faster, all of them otherwise.

A decode step of a few sequences is thousands of small ops (about 6,000 for SmolLM2 at batch 1).
With several OpenMP threads each op that goes parallel wakes and joins the others; on small VMs
(2 vCPUs, `OMP_WAIT_POLICY=PASSIVE`) that costs more than the second thread saves, so such steps
run faster on one thread, while prefill chunks and large batches still gain from all of them.
Where the line lies depends on the machine, so it is measured: `measure_single_thread_tokens`
times real paged decode steps of the engine's own model at growing batch sizes, with one thread
and with all, on scratch KV blocks (free at start-up; whatever it writes there is overwritten
before anything reads it), and returns the largest batch up to which one thread won every time.
"""
from __future__ import annotations

import logging
import time

import torch

from kvcache.kv_cache import KVCache
from kvcache.metadata import PagedMetadata
from model.transformer import Transformer

log = logging.getLogger("kvserve.engine")

PROBE_TOKENS = (1, 2, 4, 8, 16, 32)  # decode batch sizes tried, smallest first


def _step_seconds(model: Transformer, kv_cache: KVCache, tokens: int, threads: int, repeats: int) -> float:
    """Best-of-`repeats` seconds of one decode step of `tokens` one-token sequences on `threads`."""
    torch.set_num_threads(threads)
    meta = PagedMetadata.build(query_lens=[1] * tokens, context_lens=[1] * tokens,
                               block_tables=[[1 + s] for s in range(tokens)], block_size=kv_cache.block_size,
                               device=model.device)
    ids = torch.zeros(tokens, dtype=torch.long, device=model.device)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(ids, kv_cache=kv_cache, meta=meta, logits_indices=torch.arange(tokens, device=model.device))
            if i:  # the first run warms up
                best = min(best, time.perf_counter() - start)
    return best


def measure_single_thread_tokens(model: Transformer, kv_cache: KVCache, threads: int, repeats: int = 3) -> int:
    """The largest decode batch (in PROBE_TOKENS) up to which one thread beats `threads` at every
    measured size; 0 when all threads win from the first token (or there is only one thread, or
    too few KV blocks to probe with). Leaves the calling thread on `threads`."""
    if threads <= 1 or model.device.type != "cpu":
        return 0
    best, report = 0, []
    try:
        for tokens in PROBE_TOKENS:
            if tokens + 1 > kv_cache.num_blocks:  # block 0 is the null block
                break
            one = _step_seconds(model, kv_cache, tokens, 1, repeats)
            many = _step_seconds(model, kv_cache, tokens, threads, repeats)
            report.append(f"{tokens}: {one * 1e3:.1f}/{many * 1e3:.1f}")
            if one >= many:
                break
            best = tokens
    finally:
        torch.set_num_threads(threads)
    log.info("steps of up to %d tokens run on 1 thread, larger ones on %d (decode step ms, 1/%d threads, "
             "by tokens: %s)", best, threads, threads, ", ".join(report) or "not measured")
    return best
