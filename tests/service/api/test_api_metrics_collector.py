"""service.metrics without a server: scrape-time gauges from a fake Engine.stats(), observer counters and
histograms, rejections, HTTP requests, the process and python collectors, and one registry per server.
Parsed back with prometheus_client's own parser."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvcache.manager import KVCacheUsage as KVCacheStats
from service.engine.observer import EngineStats
from service.metrics import FINISH_REASONS, REJECT_REASONS, ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


M = ("model_name", "tiny")  # on every kvserve series


def stats(**kv) -> EngineStats:
    cache = dict(num_blocks=20, free_blocks=14, used_blocks=6, cached_blocks=2, stored_tokens=70, empty_slots=26,
                 prefix_queries_tokens=0, prefix_hits_tokens=0)
    cache.update(kv)
    return EngineStats(num_running=3, num_waiting=4, kv=KVCacheStats(**cache), bytes_per_token=512,
                       bytes_per_block=8192, block_size=16, capacity_tokens=320, kv_memory_bytes=21 * 8192,
                       num_preemptions=0, alive=True)


def test_gauges_are_read_from_stats_at_scrape_time():
    m = ServerMetrics("tiny")
    m.observer("gqa-2")
    current = {"s": stats()}
    m.track("gqa-2", lambda: current["s"], {"model": "tiny", "n_kv_heads": 2})
    v = (M, ("variant", "gqa-2"))
    got = samples(m)
    expected = {
        "kvserve_kv_cache_bytes_per_token": 512, "kvserve_kv_cache_bytes_per_block": 8192,
        "kvserve_kv_cache_block_size_tokens": 16, "kvserve_kv_cache_num_blocks": 20,
        "kvserve_kv_cache_capacity_tokens": 320, "kvserve_kv_cache_stored_tokens": 70,
        "kvserve_kv_cache_empty_slots": 26, "kvserve_kv_cache_usage_ratio": 6 / 20,
        "kvserve_kv_cache_memory_bytes": 21 * 8192, "kvserve_num_requests_running": 3,
        "kvserve_num_requests_waiting": 4, "kvserve_engine_alive": 1,
    }
    for name, value in expected.items():
        assert got[(name, v)] == value, name
    for state, value in (("used", 6), ("cached", 2), ("free", 12)):  # free excludes cached: states sum to 20
        assert got[("kvserve_kv_cache_blocks", (M, ("state", state), ("variant", "gqa-2")))] == value
    assert got[("kvserve_model_info", (("model", "tiny"), M, ("n_kv_heads", "2"), ("variant", "gqa-2")))] == 1
    # a later scrape sees the later snapshot
    current["s"] = stats(used_blocks=0, free_blocks=20)
    got = samples(m)
    assert got[("kvserve_kv_cache_blocks", (M, ("state", "used"), ("variant", "gqa-2")))] == 0
    assert got[("kvserve_kv_cache_usage_ratio", v)] == 0


def test_observer_feeds_counters_and_histograms():
    m = ServerMetrics("tiny")
    obs = m.observer("mqa")
    obs.on_step(phase="prefill", duration_s=0.02, num_tokens=40, num_seqs=2)
    obs.on_tokens(prompt_tokens=40, generation_tokens=2)
    obs.on_step(phase="decode", duration_s=0.004, num_tokens=2, num_seqs=2)
    obs.on_tokens(prompt_tokens=0, generation_tokens=2)
    obs.on_preemption()
    obs.on_prefix_lookup(queried_tokens=40, hit_tokens=16)
    obs.on_first_token(ttft_s=0.03, queue_time_s=0.01)
    obs.on_inter_token(latency_s=0.004)
    got = samples(m)
    v = ("variant", "mqa")
    # token counters move with the steps, before any request finishes
    assert got[("kvserve_prompt_tokens_total", (M, v))] == 40
    assert got[("kvserve_generation_tokens_total", (M, v))] == 4
    assert got[("kvserve_request_generation_tokens_count", (M, v))] == 0
    assert (obs.prompt_tokens_total, obs.generation_tokens_total) == (40, 4)
    obs.on_request_finished(finish_reason="length", prompt_tokens=25, generation_tokens=9, e2e_s=0.2)
    obs.on_request_finished(finish_reason="abort", prompt_tokens=15, generation_tokens=1, e2e_s=0.1)
    got = samples(m)
    assert got[("kvserve_requests_finished_total", (("finish_reason", "length"), M, v))] == 1
    assert got[("kvserve_requests_finished_total", (("finish_reason", "abort"), M, v))] == 1
    assert got[("kvserve_requests_finished_total", (("finish_reason", "stop"), M, v))] == 0  # exists at zero
    # finishing adds nothing to the token counters: the steps counted them
    assert got[("kvserve_prompt_tokens_total", (M, v))] == 40
    assert got[("kvserve_generation_tokens_total", (M, v))] == 4
    assert got[("kvserve_preemptions_total", (M, v))] == 1
    assert got[("kvserve_prefix_cache_queries_total", (M, v))] == 40
    assert got[("kvserve_prefix_cache_hits_total", (M, v))] == 16
    assert got[("kvserve_step_duration_seconds_count", (M, ("phase", "prefill"), v))] == 1
    assert got[("kvserve_step_duration_seconds_sum", (M, ("phase", "decode"), v))] == 0.004
    assert got[("kvserve_step_batch_tokens_sum", (M, v))] == 42
    assert got[("kvserve_step_batch_seqs_count", (M, v))] == 2
    assert got[("kvserve_time_to_first_token_seconds_sum", (M, v))] == 0.03
    assert got[("kvserve_request_queue_time_seconds_sum", (M, v))] == 0.01
    assert got[("kvserve_inter_token_latency_seconds_count", (M, v))] == 1
    assert got[("kvserve_e2e_request_latency_seconds_count", (M, v))] == 2
    assert got[("kvserve_request_prompt_tokens_sum", (M, v))] == 40
    assert got[("kvserve_request_generation_tokens_sum", (M, v))] == 10
    # histogram buckets are cumulative: 9 generated tokens fall in le=16, not in le=4
    assert got[("kvserve_request_generation_tokens_bucket", (("le", "4.0"), M, v))] == 1
    assert got[("kvserve_request_generation_tokens_bucket", (("le", "16.0"), M, v))] == 2


def test_http_requests_by_route_template_and_status():
    m = ServerMetrics("tiny")
    m.http_request("POST", "/v1/completions", 200, 0.3)
    m.http_request("POST", "/v1/completions", 200, 1.2)
    m.http_request("POST", "/v1/completions", 400, 0.001)
    m.http_request("GET", "unmatched", 404, 0.001)
    got = samples(m)

    def key(name, **labels):
        return name, tuple(sorted({"model_name": "tiny", **labels}.items()))

    assert got[key("kvserve_http_requests_total", method="POST", route="/v1/completions", status="200")] == 2
    assert got[key("kvserve_http_requests_total", method="POST", route="/v1/completions", status="400")] == 1
    assert got[key("kvserve_http_requests_total", method="GET", route="unmatched", status="404")] == 1
    assert got[key("kvserve_http_request_duration_seconds_count", method="POST", route="/v1/completions")] == 3
    assert got[key("kvserve_http_request_duration_seconds_bucket", method="POST", route="/v1/completions",
                   le="1.0")] == 2


def test_process_and_python_collectors_are_on_the_private_registry():
    names = {name for name, _ in samples(ServerMetrics("tiny"))}
    for expected in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                     "python_info", "python_gc_collections_total"):
        assert expected in names, expected


def test_rejections_by_reason_and_every_series_labelled_by_variant():
    m = ServerMetrics("tiny")
    m.observer("native")
    m.track("native", stats, {"model": "tiny"})
    m.rejected("native", "queue_full")
    m.rejected("native", "queue_full")
    m.rejected("native", "unauthorized")
    got = samples(m)
    for reason in REJECT_REASONS:
        expected = {"queue_full": 2, "unauthorized": 1}.get(reason, 0)
        assert got[("kvserve_requests_rejected_total", (M, ("reason", reason), ("variant", "native")))] == expected
    for reason in FINISH_REASONS:
        assert ("kvserve_requests_finished_total", (("finish_reason", reason), M, ("variant", "native"))) in got
    kvserve = [(name, dict(labels)) for name, labels in got if name.startswith("kvserve_")]
    assert kvserve and all(labels["variant"] == "native" and labels["model_name"] == "tiny" for _, labels in kvserve)
    assert not any(name.endswith("_created") for name, _ in got)


def test_each_server_has_its_own_registry():
    a, b = ServerMetrics("tiny"), ServerMetrics("tiny")
    a.observer("native").on_preemption()
    b.observer("native")
    assert samples(a)[("kvserve_preemptions_total", (M, ("variant", "native")))] == 1
    assert samples(b)[("kvserve_preemptions_total", (M, ("variant", "native")))] == 0


def test_engine_alive_is_0_when_either_the_snapshot_or_the_engine_says_so():
    m = ServerMetrics("tiny")
    running = {"alive": True}
    m.track("native", stats, {"model": "tiny"}, alive=lambda: running["alive"])
    key = ("kvserve_engine_alive", (M, ("variant", "native")))
    assert samples(m)[key] == 1
    running["alive"] = False  # stopped after its last snapshot
    assert samples(m)[key] == 0
