"""Logs and request ids of a live tiny server: one format for kvserve's and uvicorn's records,
`--log-format json` lines that parse, an access line at info per request (200, 400, 404, 401) with
the request id, tokens and latencies, X-Request-Id accepted and echoed on every answer, the
periodic stats line while busy, and HTTP metrics labelled by route template, never by raw path."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.service.live_server import LiveServer, wait_until

TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


@pytest.fixture(scope="module")
def json_server():
    with LiveServer("--log-format", "json", "--log-stats-interval", "0.2", "--kv-cache-memory", "1MiB",
                    "--api-key", "k") as s:
        yield s


def records(server: LiveServer) -> list[dict]:
    return [json.loads(line) for line in list(server.lines)]


def access_record(server: LiveServer, request_id: str) -> dict:
    """The access line of `request_id` (waits for it: it is written after the last byte is sent)."""
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [r for r in records(server) if r["logger"] == "kvserve.access" and r.get("request_id") == request_id]
        return bool(found)

    wait_until(seen, f"no access line for {request_id}")
    assert len(found) == 1, found
    return found[0]


AUTH = {"Authorization": "Bearer k"}


def test_every_line_is_json_with_the_same_keys_for_kvserve_and_uvicorn(json_server):
    httpx.get(json_server.url("/health"))
    recs = records(json_server)  # json.loads fails the test on any line that is not JSON
    loggers = {r["logger"] for r in recs}
    assert {"kvserve.server", "uvicorn.error"} <= loggers, loggers
    for r in recs:
        assert {"time", "level", "logger", "message"} <= set(r), r
    assert any(r["message"].startswith("torch threads:") for r in recs)


def test_access_line_of_a_completion_has_tokens_and_latencies(tiny_ref, json_server):
    r = httpx.post(json_server.url("/v1/completions"), headers={**AUTH, "X-Request-Id": "client-id-1"},
                   json={"prompt": "log me", "max_tokens": 6, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-1"
    rec = access_record(json_server, "client-id-1")
    assert rec["level"] == "INFO"
    assert (rec["method"], rec["path"], rec["route"], rec["status"], rec["variant"]) == (
        "POST", "/v1/completions", "/v1/completions", 200, "native")
    assert rec["prompt_tokens"] == len(tiny_ref.encode("log me")) == r.json()["usage"]["prompt_tokens"]
    assert rec["output_tokens"] == 6
    assert 0 < rec["ttft_s"] <= rec["e2e_s"]


def test_access_line_of_a_stream_covers_the_whole_stream(json_server):
    body = {"prompt": "stream me", "max_tokens": 12, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", json_server.url("/v1/completions"), headers={**AUTH, "X-Request-Id": "stream-1"},
                      json=body, timeout=60) as r:
        assert r.headers["x-request-id"] == "stream-1"
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    rec = access_record(json_server, "stream-1")
    assert (rec["status"], rec["output_tokens"]) == (200, 12)


@pytest.mark.parametrize("method,path,body,headers,status", [
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, AUTH, 400),
    ("GET", "/no/such/route", None, {}, 404),
    ("POST", "/v1/completions", {"prompt": "x"}, {}, 401),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, AUTH, 400),
])
def test_errors_get_an_info_access_line_and_the_request_id(request, json_server, method, path, body, headers, status):
    rid = "err-" + re.sub(r"[^A-Za-z0-9]", "-", request.node.callspec.id)  # unique per case
    r = httpx.request(method, json_server.url(path), json=body, headers={**headers, "X-Request-Id": rid}, timeout=60)
    assert r.status_code == status and r.headers["x-request-id"] == rid
    rec = access_record(json_server, rid)
    assert (rec["level"], rec["status"], rec["path"]) == ("INFO", status, path)
    assert rec["route"] == ("unmatched" if status == 404 else path)


def test_a_request_id_is_made_when_absent_and_a_bad_one_is_refused(json_server):
    made = httpx.get(json_server.url("/v1/models"), headers=AUTH).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert httpx.get(json_server.url("/v1/models"), headers=AUTH).headers["x-request-id"] != made
    bad = httpx.get(json_server.url("/v1/models"), headers={**AUTH, "X-Request-Id": "has space"})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "X-Request-Id" and "'has space'" in error["message"] and "1-128" in error["message"]
    too_long = httpx.get(json_server.url("/health"), headers={"X-Request-Id": "x" * 129})
    assert too_long.status_code == 400 and "129 characters" in too_long.json()["error"]["message"]


def test_probes_and_scrapes_are_not_logged_at_info(json_server):
    httpx.get(json_server.url("/health"), headers={"X-Request-Id": "probe-1"})
    httpx.get(json_server.url("/metrics"), headers={"X-Request-Id": "scrape-1"})
    httpx.get(json_server.url("/no/such/route"), headers={"X-Request-Id": "after-probes"})
    access_record(json_server, "after-probes")  # logged after the two above
    assert not [r for r in records(json_server) if r.get("request_id") in ("probe-1", "scrape-1")]


def test_stats_line_while_busy(json_server):
    before = len(json_server.lines)
    r = httpx.post(json_server.url("/v1/completions"), headers=AUTH,
                   json={"prompt": "keep busy", "max_tokens": 40, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200

    def stats_lines():
        return [rec for rec in (json.loads(line) for line in json_server.lines[before:]) if rec["logger"] == "kvserve.stats"]

    wait_until(lambda: any(rec["generation_tokens_per_s"] > 0 for rec in stats_lines()), "no stats line with tokens")
    rec = next(rec for rec in stats_lines() if rec["generation_tokens_per_s"] > 0)
    assert rec["variant"] == "native" and rec["level"] == "INFO"
    assert {"running", "waiting", "kv_usage", "kv_blocks_used", "kv_blocks_cached", "kv_blocks_free",
            "prompt_tokens_per_s", "preemptions"} <= set(rec)
    assert "tok/s" in rec["message"] and "KV usage" in rec["message"]


def test_http_metrics_use_the_route_template(json_server):
    httpx.get(json_server.url("/no/such/route/12345"))
    m = json_server.metrics()
    routes = {dict(labels)["route"] for name, labels in m if name == "kvserve_http_requests_total"}
    assert "/no/such/route/12345" not in routes and "unmatched" in routes
    assert json_server.metric("kvserve_http_requests_total", method="GET", route="unmatched", status="404") >= 1
    assert json_server.metric("kvserve_http_requests_total", method="POST", route="/v1/completions",
                              status="200") >= 2
    assert json_server.metric("kvserve_http_request_duration_seconds_count", method="POST",
                              route="/v1/completions") >= 2


def test_text_format_is_one_format_for_every_logger():
    with LiveServer("--kv-cache-memory", "1MiB") as server:
        r = httpx.post(server.url("/v1/completions"), headers={"X-Request-Id": "text-1"},
                       json={"prompt": "text", "max_tokens": 3, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200
        wait_until(lambda: any("request_id=text-1" in line for line in server.lines), "no access line")
        lines = list(server.lines)
    (access,) = [line for line in lines if "request_id=text-1" in line]
    assert re.search(r" INFO kvserve\.access: POST /v1/completions 200 request_id=text-1 variant=native "
                     r"prompt_tokens=\d+ output_tokens=3 ttft=[\d.]+s e2e=[\d.]+s$", access.rstrip()), access
    assert any(" INFO uvicorn.error: " in line for line in lines)
    assert all(TEXT_LINE.match(line) for line in lines), [line for line in lines if not TEXT_LINE.match(line)]


@pytest.mark.slow
def test_loading_a_gguf_without_a_terminal_draws_no_progress_bar():
    # the GGUF loader's tqdm bar would land in container logs: on a pipe it must stay off, so a
    # JSON log of a real SmolLM2 start-up is JSON from the first line to the last
    with LiveServer("--model", "smollm2-135m", "--log-format", "json", "--kv-cache-memory", "32MiB") as server:
        recs = records(server)
    assert any(r["message"].startswith("variant native:") for r in recs)
    assert not any("dequantizing" in line for line in server.lines)
