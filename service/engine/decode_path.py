"""Which form of the paged attention a decode step runs: the tiled flash form or gather + SDPA.

With `--attention flash` (the default) decode steps have two exact forms: the flash form (one K
gather, scores and softmax in batched products, V read in place by `embedding_bag`) and the sdpa
form (K and V gathered into one padded batch for torch's fused SDPA kernel). Which is faster
depends on the batch and the machine: on the 2-vCPU AVX2 development VM SDPA won for a single
sequence and lost at 32. So each engine measures, at start, one layer's decode attention in both
forms at growing batch sizes (PROBE_TOKENS sequences of PROBE_CONTEXT tokens of context, on the
thread count such a step will run on) and runs pure decode steps of up to the largest size at
which SDPA won every time in the sdpa form; prefill, mixed steps and larger batches stay flash.
Both forms are tested against the same float64 reference (tests/kvcache/test_paged_forward.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvcache.kv_cache import KVCache
from model.paged_attention import PAGED_ATTENTION_IMPLS
from model.transformer import Transformer
from service.engine.step_threads import PROBE_CONTEXT, probe_line, probe_metadata

log = logging.getLogger("kvserve.engine")


def _attention_seconds(model: Transformer, kv_cache: KVCache, tokens: int, form: str, repeats: int) -> float:
    """Best-of-`repeats` seconds of layer 0's decode attention in `form` for `tokens` sequences."""
    cfg = model.config
    plan = model.plan(probe_metadata(model, kv_cache, tokens), attention=form)
    q = torch.randn(tokens, cfg.n_heads, cfg.head_dim, generator=torch.Generator().manual_seed(0)).to(
        device=model.device, dtype=model.dtype)
    attend = PAGED_ATTENTION_IMPLS[form]
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            attend(q, kv_cache.k[0], kv_cache.v[0], plan)
            if i:  # the first run warms up
                best = min(best, time.perf_counter() - start)
    return best


def measure_sdpa_decode_seqs(model: Transformer, kv_cache: KVCache, threads_for: Callable[[int], int],
                             repeats: int = 5) -> int:
    """The largest decode batch (in PROBE_TOKENS) up to which the sdpa form beat the flash form at
    every measured size, each size timed on `threads_for(size)` threads; 0 when flash wins from the
    first sequence, for another --attention than flash, or off CPU. Leaves the thread count as it was."""
    if model.attention != "flash" or model.device.type != "cpu":
        return 0
    before = torch.get_num_threads()

    def seconds(tokens: int) -> tuple[float, float]:
        torch.set_num_threads(threads_for(tokens))
        return (_attention_seconds(model, kv_cache, tokens, "sdpa", repeats),
                _attention_seconds(model, kv_cache, tokens, "flash", repeats))
    try:
        best, report = probe_line(model, kv_cache, seconds, digits=3)
    finally:
        torch.set_num_threads(before)
    log.info("decode steps of up to %d sequences run in the sdpa form, larger ones in the flash form (one layer's "
             "decode attention ms, sdpa/flash, by sequences of up to %d tokens of context: %s)", best, PROBE_CONTEXT,
             ", ".join(report) or "not measured")
    return best
