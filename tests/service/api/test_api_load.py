"""Behaviour under load and at shutdown, against live tiny servers: a full waiting queue answers 503 with
Retry-After and the server recovers; --request-timeout ends a request with "timeout"; SIGTERM stops
admitting (503, /health 503), lets in-flight requests finish (or aborts them past --shutdown-timeout)
and exits 0.

The long requests here generate 400+ tokens one decode step at a time, far more work than the few
HTTP round trips each test makes while they run; no assertion is about how long anything takes.
"""
from __future__ import annotations

import json
import threading

import httpx

from tests.service.live_server import LiveServer, open_raw_request, read_sse, wait_until

LONG = 450  # tokens; the tiny model's context is 512


def stream_first_event(client: httpx.Client, url: str, body: dict):
    """Open a streaming request and read its first event; returns (response context, event iterator)."""
    ctx = client.stream("POST", url, json={**body, "stream": True})
    r = ctx.__enter__()
    assert r.status_code == 200
    lines = (line for line in r.iter_lines() if line)
    first = next(lines)
    return ctx, r, first, lines


def test_queue_overflow_is_503_then_recovers():
    # configured through the environment, as a container would: this also shows KVSERVE_* reach the server
    env = {"KVSERVE_MAX_NUM_SEQS": "1", "KVSERVE_MAX_QUEUE": "1", "KVSERVE_KV_CACHE_MEMORY": "1MiB"}
    with LiveServer(env=env) as server, httpx.Client(base_url=server.base_url, timeout=60) as http:
        def metric(name, **labels):
            return server.metric(name, variant="native", **labels)

        # A runs (the batch holds one), B waits (the queue holds one), C is refused
        ctx, _, _, _ = stream_first_event(http, "/v1/completions", {"prompt": "A", "max_tokens": LONG, "ignore_eos": True})
        b = open_raw_request(server.base_url, "/v1/completions", {"prompt": "B", "max_tokens": 4, "stream": True})
        server.wait_for_metric("kvserve_num_requests_waiting", 1, variant="native")
        rejected = metric("kvserve_requests_rejected_total", reason="queue_full")
        for path, body in (("/v1/completions", {"prompt": "C", "max_tokens": 4}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "C"}], "stream": True}),
                           ("/generate", {"inputs": "C"})):
            r = http.post(path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            error = r.json()  # OpenAI's error body, or TGI's on /generate
            assert error["error"]["code"] == "queue_full" if path != "/generate" else error["error_type"] == "overloaded"
        assert metric("kvserve_requests_rejected_total", reason="queue_full") == rejected + 3
        assert http.get("/health").status_code == 200  # overloaded is not unhealthy
        # B's client leaves while B is still queued: B is aborted and leaves the queue
        aborts = metric("kvserve_requests_finished_total", finish_reason="abort")
        b.close()
        server.wait_for_metric("kvserve_requests_finished_total", aborts + 1, variant="native", finish_reason="abort")
        assert metric("kvserve_num_requests_waiting") == 0 and metric("kvserve_num_requests_running") == 1
        # a new request queues behind A again, and is served once A's client leaves too
        result = {}
        waiter = threading.Thread(target=lambda: result.update(
            d=httpx.post(server.url("/v1/completions"), json={"prompt": "D", "max_tokens": 4}, timeout=60)))
        waiter.start()
        server.wait_for_metric("kvserve_num_requests_waiting", 1, variant="native")
        ctx.__exit__(None, None, None)
        waiter.join(60)
        assert result["d"].status_code == 200 and result["d"].json()["usage"]["completion_tokens"] >= 1
        server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant="native", state="used")


def test_request_timeout_ends_with_timeout_and_frees_blocks():
    with LiveServer("--request-timeout", "0.25", "--kv-cache-memory", "1MiB") as server, \
            httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {"prompt": "slow", "max_tokens": LONG, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        if r.status_code == 200:  # it produced tokens, then ran out of time
            assert r.json()["choices"][0]["finish_reason"] == "timeout"
            assert 1 <= r.json()["usage"]["completion_tokens"] < LONG
        else:  # nothing before the deadline: an error, not an empty success, and no invitation to retry at once
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
            assert int(r.headers["retry-after"]) >= 1
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            raw = s.read().decode()
        if s.status_code == 200:
            events = read_sse(raw)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "timeout"
        else:
            assert s.status_code == 503
        server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant="native", state="used")
        assert server.metric("kvserve_requests_finished_total", variant="native", finish_reason="timeout") == 2
        assert http.get("/health").status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0():
    server = LiveServer("--kv-cache-memory", "1MiB", "--shutdown-timeout", "120").start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            ctx, r, first, lines = stream_first_event(http, "/generate", {"inputs": "drain me", "parameters": {
                "max_new_tokens": LONG, "ignore_eos": True}})
            server.signal()
            wait_until(lambda: http.get("/health").status_code == 503, "/health never turned 503")
            assert http.get("/health").json()["status"] == "draining"
            refused = http.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert server.metric("kvserve_requests_rejected_total", variant="native", reason="draining") == 1
            events = [first, *lines]
            ctx.__exit__(None, None, None)
        tokens = [json.loads(e[len("data:"):]) for e in events]  # TGI's stream: one token per event, no [DONE]
        assert tokens[-1]["details"]["finish_reason"] == "length"  # finished, not cut off
        assert len(tokens) == LONG and all("token" in t for t in tokens)
        assert server.wait() == 0
        assert "draining" in server.log
    finally:
        server.kill()


def test_sigterm_past_the_shutdown_timeout_aborts_and_still_exits_0():
    server = LiveServer("--kv-cache-memory", "1MiB", "--shutdown-timeout", "0").start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            ctx, r, first, lines = stream_first_event(http, "/v1/completions", {
                "prompt": "cut me", "max_tokens": LONG, "ignore_eos": True})
            server.signal()
            events = [first, *lines]  # read to the end before waiting: the server flushes, then exits
            ctx.__exit__(None, None, None)
        assert server.wait() == 0
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "abort"
    finally:
        server.kill()
