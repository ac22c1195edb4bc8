"""How many threads a step runs on: one for small steps where that is faster, all of them otherwise.

A decode step of a few sequences is thousands of small ops (about 6,000 for SmolLM2 at batch 1).
With several OpenMP threads each op that goes parallel wakes and joins the others; on small VMs
(2 vCPUs, `OMP_WAIT_POLICY=PASSIVE`) that costs more than the second thread saves, so such steps
run faster on one thread, while prefill chunks and large batches still gain from all of them.
Where the line lies depends on the machine, so it is measured: `measure_single_thread_tokens`
times real paged decode steps of the engine's own model at growing batch sizes, with one thread
and with all, on scratch KV blocks (free at start-up; whatever it writes there is overwritten
before anything reads it), and returns the largest batch up to which one thread won every time.
Each probed sequence has PROBE_CONTEXT tokens of context (fewer where the model or the free
blocks allow less), so the attention weighs what it does in a served step: with one-token
contexts the probe saw almost only the linears and drew the line too high.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvcache.kv_cache import KVCache
from kvcache.metadata import PagedMetadata
from model.transformer import Transformer

log = logging.getLogger("kvserve.engine")

PROBE_TOKENS = (1, 2, 4, 8, 16, 32)  # decode batch sizes tried, smallest first
PROBE_CONTEXT = 256  # tokens of context per probed sequence


def probe_context(model: Transformer, kv_cache: KVCache, tokens: int) -> int:
    """Context per sequence for a probe of `tokens` sequences: PROBE_CONTEXT, or what fits in
    the model's positions and the KV blocks (block 0 is the null block); 0 when nothing fits."""
    pages = (kv_cache.num_blocks - 1) // tokens
    return min(PROBE_CONTEXT, model.config.max_seq_len, pages * kv_cache.block_size)


def probe_metadata(model: Transformer, kv_cache: KVCache, tokens: int) -> PagedMetadata:
    """A decode step of `tokens` sequences of probe_context tokens each, on their own scratch pages."""
    context, bs = probe_context(model, kv_cache, tokens), kv_cache.block_size
    pages = -(-context // bs)
    tables = [[1 + s * pages + p for p in range(pages)] for s in range(tokens)]
    return PagedMetadata.build(query_lens=[1] * tokens, context_lens=[context] * tokens, block_tables=tables,
                               block_size=bs, device=model.device)


def probe_line(model: Transformer, kv_cache: KVCache, seconds: Callable[[int], tuple[float, float]],
               digits: int) -> tuple[int, list[str]]:
    """The largest size in PROBE_TOKENS up to which the first of `seconds(size)` (a challenger's
    time, then the incumbent's) was lower every time, and the measurements in words (ms)."""
    best, report = 0, []
    for tokens in PROBE_TOKENS:
        if not probe_context(model, kv_cache, tokens):
            break
        challenger, incumbent = seconds(tokens)
        report.append(f"{tokens}: {challenger * 1e3:.{digits}f}/{incumbent * 1e3:.{digits}f}")
        if challenger >= incumbent:
            break
        best = tokens
    return best, report


def _step_seconds(model: Transformer, kv_cache: KVCache, tokens: int, threads: int, repeats: int) -> float:
    """Best-of-`repeats` seconds of one decode step of `tokens` sequences on `threads`."""
    torch.set_num_threads(threads)
    meta = probe_metadata(model, kv_cache, tokens)
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

    def seconds(tokens: int) -> tuple[float, float]:
        return (_step_seconds(model, kv_cache, tokens, 1, repeats),
                _step_seconds(model, kv_cache, tokens, threads, repeats))
    try:
        best, report = probe_line(model, kv_cache, seconds, digits=1)
    finally:
        torch.set_num_threads(threads)
    log.info("steps of up to %d tokens run on 1 thread, larger ones on %d (decode step ms, 1/%d threads, by "
             "tokens, up to %d tokens of context each: %s)", best, threads, threads, PROBE_CONTEXT,
             ", ".join(report) or "not measured")
    return best
