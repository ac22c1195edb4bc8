"""How the engine reports what happened, without knowing about Prometheus.

The engine thread calls an `EngineObserver` (the metrics module implements one per variant);
gauges are read at scrape time from `Engine.stats()`, an `EngineStats` snapshot. The base class
does nothing, so an engine without metrics (tests, offline benchmarks) pays nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcache.manager import KVCacheUsage


class EngineObserver:
    def on_step(self, *, phase: str, duration_s: float, num_tokens: int, num_seqs: int) -> None:
        """One model step; phase is "prefill", "decode" or "mixed"."""

    def on_tokens(self, *, prompt_tokens: int, generation_tokens: int) -> None:
        """After each step, before its outputs are delivered: the tokens it sampled, and the prompt
        tokens of the requests whose first token it produced (their prefill is complete)."""

    def on_preemption(self) -> None:
        """A running request was preempted (its blocks freed, to be recomputed)."""

    def on_prefix_lookup(self, *, queried_tokens: int, hit_tokens: int) -> None:
        """A request was admitted; hit_tokens of its queried_tokens came from the prefix cache."""

    def on_first_token(self, *, ttft_s: float, queue_time_s: float) -> None:
        """A request produced its first token (ttft from arrival; queue time = arrival to first schedule)."""

    def on_inter_token(self, *, latency_s: float) -> None:
        """Gap between two consecutive tokens of one request."""

    def on_request_finished(self, *, finish_reason: str, prompt_tokens: int, generation_tokens: int,
                            e2e_s: float) -> None:
        """A request left the engine (any finish_reason: stop, length, abort, timeout, error)."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv: KVCacheUsage
    bytes_per_token: int
    bytes_per_block: int
    block_size: int
    capacity_tokens: int
    kv_memory_bytes: int
    num_preemptions: int
    alive: bool
