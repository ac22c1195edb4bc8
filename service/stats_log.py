"""The periodic stats line: what each variant is doing, every `interval` seconds while it is busy.

Like vLLM's "Avg prompt throughput ... Running: N reqs, Waiting: N reqs, GPU KV cache usage" line:
one record per variant on the `kvserve.stats` logger with running and waiting requests, KV usage
(blocks used / cached / free), prompt and generation tokens per second over the interval and the
preemptions in it. An idle variant (nothing running or waiting, no tokens since the last line)
logs nothing. A daemon thread; it only reads engine snapshots and the observers' running totals.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from service.engine import Engine
from service.metrics import ServerMetrics

log = logging.getLogger("kvserve.stats")


@dataclass(frozen=True, slots=True)
class _Totals:
    time: float
    prompt_tokens: int
    generation_tokens: int
    preemptions: int


class StatsLogger:
    def __init__(self, engines: dict[str, Engine], metrics: ServerMetrics, interval_s: float):
        self.engines = engines        # variant -> Engine (stats() snapshots)
        self.metrics = metrics        # observers[variant] keeps the token totals
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, _Totals] = {}

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._last = {v: self._totals(v) for v in self.engines}
            self._thread = threading.Thread(target=self._run, name="kvserve-stats", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.log_once()

    def _totals(self, variant: str) -> _Totals:
        obs = self.metrics.observers[variant]
        return _Totals(time.monotonic(), obs.prompt_tokens_total, obs.generation_tokens_total,
                       self.engines[variant].stats().num_preemptions)

    def log_once(self) -> None:
        """One line per variant that was busy since the previous call."""
        for variant, engine in self.engines.items():
            s = engine.stats()
            now, before = self._totals(variant), self._last[variant]
            self._last[variant] = now
            prompt, generation = now.prompt_tokens - before.prompt_tokens, now.generation_tokens - before.generation_tokens
            preempted = now.preemptions - before.preemptions
            if not (s.num_running or s.num_waiting or prompt or generation or preempted):
                continue
            elapsed = max(now.time - before.time, 1e-9)
            kv = s.kv
            free = kv.free_blocks - kv.cached_blocks
            fields = {"variant": variant, "running": s.num_running, "waiting": s.num_waiting,
                      "kv_usage": round(kv.usage_ratio, 4), "kv_blocks_used": kv.used_blocks,
                      "kv_blocks_cached": kv.cached_blocks, "kv_blocks_free": free,
                      "prompt_tokens_per_s": round(prompt / elapsed, 1),
                      "generation_tokens_per_s": round(generation / elapsed, 1), "preemptions": preempted}
            log.info("variant %s: running %d, waiting %d, KV usage %.1f%% (%d used, %d cached, %d free blocks), "
                     "prompt %.1f tok/s, generation %.1f tok/s, preemptions %d",
                     variant, s.num_running, s.num_waiting, 100 * kv.usage_ratio, kv.used_blocks, kv.cached_blocks,
                     free, fields["prompt_tokens_per_s"], fields["generation_tokens_per_s"], preempted, extra=fields)
