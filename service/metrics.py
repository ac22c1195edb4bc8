"""Prometheus metrics of one server: the only module that creates metrics.

Each server owns a CollectorRegistry (never the process-global one), so tests can run several
servers in one process. Its sources:
- `VariantObserver`, one per engine: the engine thread reports steps, tokens and finished requests
  (counters and histograms, thread-safe in prometheus_client). Token counters move every step;
  the per-request histograms when a request finishes;
- `_EngineStatsCollector`: gauges read from `Engine.stats()` at scrape time (KV footprint and
  occupancy, queue sizes, liveness) plus the `kvserve_model_info` info metric;
- `ServerMetrics.rejected`: requests the API refused before they reached an engine;
- `ServerMetrics.http_request`: every HTTP request by route template and status (service.api.middleware);
- prometheus_client's process_* (CPU, RSS, open files) and python_* (GC, version) collectors.
Every kvserve_ series carries `model_name` (the model served, so several deployments share one
dashboard) and, except the HTTP ones, `variant` (the variant as served: native, mha, gqa-3, mqa, ...).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from service.engine.observer import EngineObserver, EngineStats

# The `_created` companion series double every scrape and no dashboard or rule here reads them.
# (A library-wide switch: it only changes what the exposition omits.)
disable_created_metrics()

FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")
REJECT_REASONS = ("queue_full", "invalid", "too_long", "unauthorized", "draining")
STEP_PHASES = ("prefill", "decode", "mixed")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class VariantObserver(EngineObserver):
    """What one engine reports, recorded under its variant's label."""

    def __init__(self, metrics: ServerMetrics, variant: str):
        m, v = metrics, (metrics.model_name, variant)
        self._finished = {r: m.requests_finished.labels(*v, r) for r in FINISH_REASONS}
        self._steps = {p: m.step_duration.labels(*v, p) for p in STEP_PHASES}
        self._prompt_tokens, self._generation_tokens = m.prompt_tokens.labels(*v), m.generation_tokens.labels(*v)
        self._preemptions = m.preemptions.labels(*v)
        self._prefix_queries, self._prefix_hits = m.prefix_queries.labels(*v), m.prefix_hits.labels(*v)
        self._ttft, self._itl = m.ttft.labels(*v), m.itl.labels(*v)
        self._e2e, self._queue = m.e2e.labels(*v), m.queue_time.labels(*v)
        self._req_prompt, self._req_generation = m.request_prompt_tokens.labels(*v), m.request_generation_tokens.labels(*v)
        self._batch_tokens, self._batch_seqs = m.batch_tokens.labels(*v), m.batch_seqs.labels(*v)
        # plain running totals for the stats line and /stats (written by the engine thread only)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def on_step(self, *, phase: str, duration_s: float, num_tokens: int, num_seqs: int) -> None:
        self._steps[phase].observe(duration_s)
        self._batch_tokens.observe(num_tokens)
        self._batch_seqs.observe(num_seqs)

    def on_tokens(self, *, prompt_tokens: int, generation_tokens: int) -> None:
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(generation_tokens)
        self.prompt_tokens_total += prompt_tokens
        self.generation_tokens_total += generation_tokens

    def on_preemption(self) -> None:
        self._preemptions.inc()

    def on_prefix_lookup(self, *, queried_tokens: int, hit_tokens: int) -> None:
        self._prefix_queries.inc(queried_tokens)
        self._prefix_hits.inc(hit_tokens)

    def on_first_token(self, *, ttft_s: float, queue_time_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._queue.observe(queue_time_s)

    def on_inter_token(self, *, latency_s: float) -> None:
        self._itl.observe(latency_s)

    def on_request_finished(self, *, finish_reason: str, prompt_tokens: int, generation_tokens: int,
                            e2e_s: float) -> None:
        self._finished[finish_reason].inc()
        self._req_prompt.observe(prompt_tokens)
        self._req_generation.observe(generation_tokens)
        self._e2e.observe(e2e_s)


class _EngineStatsCollector:
    """Gauges computed from each engine's `stats()` snapshot when Prometheus scrapes."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.engines: dict[str, tuple[Callable[[], EngineStats], Callable[[], bool], dict[str, str]]] = {}

    def collect(self) -> Iterator:
        def gauge(name, doc, extra_labels=()):
            return GaugeMetricFamily(name, doc, labels=["model_name", "variant", *extra_labels])

        fam = {
            "bpt": gauge("kvserve_kv_cache_bytes_per_token", "KV bytes one token occupies across all layers "
                         "(2 * n_layers * n_kv_heads * head_dim * dtype bytes)"),
            "bpb": gauge("kvserve_kv_cache_bytes_per_block", "KV bytes of one block"),
            "bs": gauge("kvserve_kv_cache_block_size_tokens", "Tokens per KV block"),
            "blocks": gauge("kvserve_kv_cache_blocks", "KV blocks by state: used (referenced), cached "
                            "(unreferenced, holding a reusable prefix), free (empty); they sum to the usable blocks", ["state"]),
            "nb": gauge("kvserve_kv_cache_num_blocks", "Usable KV blocks (the null block excluded)"),
            "cap": gauge("kvserve_kv_cache_capacity_tokens", "Tokens the usable KV blocks hold"),
            "stored": gauge("kvserve_kv_cache_stored_tokens", "Tokens whose K/V live in used blocks"),
            "empty": gauge("kvserve_kv_cache_empty_slots", "Allocated token slots holding no token yet"),
            "usage": gauge("kvserve_kv_cache_usage_ratio", "Used blocks / usable blocks (0-1)"),
            "mem": gauge("kvserve_kv_cache_memory_bytes", "Bytes of the K and V tensors"),
            "running": gauge("kvserve_num_requests_running", "Requests in the running batch"),
            "waiting": gauge("kvserve_num_requests_waiting", "Requests waiting to be admitted"),
            "alive": gauge("kvserve_engine_alive", "1 while the engine loop runs, else 0"),
        }
        info = InfoMetricFamily("kvserve_model", "The model and attention layout each variant serves")
        for variant, (stats_fn, alive_fn, labels) in self.engines.items():
            s = stats_fn()
            for key, value in (("bpt", s.bytes_per_token), ("bpb", s.bytes_per_block), ("bs", s.block_size),
                               ("nb", s.kv.num_blocks), ("cap", s.capacity_tokens), ("stored", s.kv.stored_tokens),
                               ("empty", s.kv.empty_slots), ("usage", s.kv.usage_ratio), ("mem", s.kv_memory_bytes),
                               ("running", s.num_running), ("waiting", s.num_waiting),
                               ("alive", int(s.alive and alive_fn()))):
                fam[key].add_metric([self.model_name, variant], value)
            blocks = (("used", s.kv.used_blocks), ("cached", s.kv.cached_blocks),
                      ("free", s.kv.free_blocks - s.kv.cached_blocks))
            for state, value in blocks:
                fam["blocks"].add_metric([self.model_name, variant, state], value)
            info.add_metric([], {"model_name": self.model_name, "variant": variant, **labels})
        yield from fam.values()
        yield info


class ServerMetrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        v = ["model_name", "variant"]
        self.requests_finished = Counter("kvserve_requests_finished", "Requests that left the engine, by finish_reason",
                                         v + ["finish_reason"], registry=r)
        self.requests_rejected = Counter("kvserve_requests_rejected", "Requests refused before reaching the engine, "
                                         "by reason", v + ["reason"], registry=r)
        self.prompt_tokens = Counter("kvserve_prompt_tokens", "Prompt tokens of requests whose prefill completed, "
                                     "counted in the step of their first token", v, registry=r)
        self.generation_tokens = Counter("kvserve_generation_tokens", "Generated tokens, counted in the step that "
                                         "sampled them", v, registry=r)
        self.preemptions = Counter("kvserve_preemptions", "Running requests preempted for KV blocks (recomputed)", v,
                                   registry=r)
        self.prefix_queries = Counter("kvserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      v, registry=r)
        self.prefix_hits = Counter("kvserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", v,
                                   registry=r)
        self.ttft = Histogram("kvserve_time_to_first_token_seconds", "Arrival to first token", v,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvserve_inter_token_latency_seconds", "Gap between consecutive tokens of a request", v,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds", "Arrival to finish", v, buckets=_E2E_BUCKETS,
                             registry=r)
        self.queue_time = Histogram("kvserve_request_queue_time_seconds", "Arrival to first scheduled", v,
                                    buckets=_E2E_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("kvserve_request_prompt_tokens", "Prompt tokens per request", v,
                                               buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("kvserve_request_generation_tokens", "Generated tokens per request",
                                                   v, buckets=_TOKEN_BUCKETS, registry=r)
        self.step_duration = Histogram("kvserve_step_duration_seconds", "Model step wall time, by phase",
                                       v + ["phase"], buckets=_STEP_BUCKETS, registry=r)
        self.batch_tokens = Histogram("kvserve_step_batch_tokens", "Tokens computed per step", v,
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_seqs = Histogram("kvserve_step_batch_seqs", "Sequences per step", v, buckets=_SEQ_BUCKETS,
                                    registry=r)
        self.http_requests = Counter("kvserve_http_requests", "HTTP requests answered, by route template and status",
                                     ["model_name", "method", "route", "status"], registry=r)
        self.http_duration = Histogram("kvserve_http_request_duration_seconds", "HTTP request arrival to the last "
                                       "byte of the answer (a stream's whole length)", ["model_name", "method", "route"],
                                       buckets=_HTTP_BUCKETS, registry=r)
        self._stats = _EngineStatsCollector(model_name)
        r.register(self._stats)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.observers: dict[str, VariantObserver] = {}

    def observer(self, variant: str) -> VariantObserver:
        """The observer to hand the engine of `variant`; creates its series at zero."""
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(self.model_name, variant, reason)
        self.observers[variant] = VariantObserver(self, variant)
        return self.observers[variant]

    def track(self, variant: str, stats: Callable[[], EngineStats], info: Mapping[str, object],
              alive: Callable[[], bool] = lambda: True) -> None:
        """Read `stats()` at every scrape for the gauges; `info` labels kvserve_model_info. `alive()`
        is asked too: a stopped engine's last snapshot may predate its stop."""
        self._stats.engines[variant] = (stats, alive, {k: str(val) for k, val in info.items()})

    def latency_buckets(self, variant: str) -> dict[str, list[list[float | None]]]:
        """TTFT and ITL of `variant` as cumulative [upper bound (None: +Inf), count] pairs, as scraped:
        the web page draws their quantiles over time from these, as histogram_quantile would."""
        out: dict[str, list[list[float | None]]] = {}
        for key, histogram in (("ttft", self.ttft), ("itl", self.itl)):
            out[key] = [[None if s.labels["le"] == "+Inf" else float(s.labels["le"]), s.value]
                        for family in histogram.collect() for s in family.samples
                        if s.name.endswith("_bucket") and s.labels.get("variant") == variant]
        return out

    def rejected(self, variant: str, reason: str) -> None:
        self.requests_rejected.labels(self.model_name, variant, reason).inc()

    def http_request(self, method: str, route: str, status: int, duration_s: float) -> None:
        """`route` is the route template (`/v1/completions`), never a raw path: bounded cardinality."""
        self.http_requests.labels(self.model_name, method, route, str(status)).inc()
        self.http_duration.labels(self.model_name, method, route).observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST
