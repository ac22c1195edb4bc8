"""No schema takes the live server down (issue 21), against `kvserve serve --model tiny`:

- over --grammar-compile-timeout a spec is a 400 naming its field, and its compile process is gone;
- two slow schemas compiling do not hold up a small one;
- a client's disconnect, and --request-timeout, cancel the compile (its process exits well before the budget);
- SIGTERM while a compile runs ends the server promptly, with status 0, leaving no process behind.

The slow schema (tests.service.hostile_schemas) compiles for minutes and passes every cheap check.
Process ids come from /proc: the server's child is the grammar zygote, whose children are the
compiles. The budget options go in as KVSERVE_* variables, so the same tests run against a server
that does not know them (and fail there, as they did before issue 21).
"""
from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from tests.service.hostile_schemas import slow_schema
from tests.service.live_server import LiveServer, open_raw_request, wait_until
from tests.service.processes import alive, children, descendants

SMALL_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def body(tag: str, **extra) -> dict:
    return {"prompt": "x", "max_tokens": 4, "guided_json": slow_schema(tag), **extra}


def compiles(server: LiveServer) -> list[int]:
    """Compile processes running now: the children of the server's children (the zygote's)."""
    return [pid for zygote in children(server.proc.pid) for pid in children(zygote)]


def warm_up(server: LiveServer) -> None:
    """Small structured requests until one is answered: the zygote starts (seconds, and the imports go on
    when a request times out first) before anything is timed."""
    for _ in range(10):
        r = httpx.post(server.url("/v1/completions"), timeout=120,
                       json={"prompt": "x", "max_tokens": 4, "guided_json": SMALL_SCHEMA})
        if r.status_code != 503:
            break
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def short_budget():
    with LiveServer("--kv-cache-memory", "2MiB", env={"KVSERVE_GRAMMAR_COMPILE_TIMEOUT": "2"}) as server:
        warm_up(server)
        yield server


@pytest.fixture(scope="module")
def long_budget():
    """Compiles may run a minute; requests end after 12 s; a drain lasts at most 3 s."""
    with LiveServer("--request-timeout", "12", "--shutdown-timeout", "3", "--kv-cache-memory", "2MiB",
                    env={"KVSERVE_GRAMMAR_COMPILE_TIMEOUT": "60"}) as server:
        warm_up(server)
        yield server


@pytest.mark.timeout(180)
@pytest.mark.parametrize("field,value", [
    ("guided_json", slow_schema("json")),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": slow_schema("rf")}}),
    ("structured_outputs", {"json": json.dumps(slow_schema("so"))}),
])
def test_a_spec_over_the_compile_budget_is_a_400_naming_its_field(short_budget, field, value):
    started = time.monotonic()
    r = httpx.post(short_budget.url("/v1/completions"), timeout=120,
                   json={"prompt": "x", "max_tokens": 4, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    param = {"response_format": "response_format.json_schema.schema",
             "structured_outputs": "structured_outputs.json"}.get(field, field)
    assert error["param"] == param
    assert "too complex to compile within 2s (--grammar-compile-timeout)" in error["message"]
    assert error["message"].startswith(param)
    assert time.monotonic() - started < 60  # the budget, not the minutes the compile would take
    assert compiles(short_budget) == []


@pytest.mark.timeout(180)
def test_the_same_on_tgi_generate(short_budget):
    r = httpx.post(short_budget.url("/generate"), timeout=120, json={
        "inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": {"type": "json", "value": slow_schema("tgi")}}})
    assert r.status_code == 400 and "too complex to compile" in r.json()["error"], r.text
    assert compiles(short_budget) == []
    assert "Traceback" not in short_budget.log


@pytest.mark.timeout(180)
def test_two_slow_schemas_then_a_small_one(long_budget):
    socks = [open_raw_request(long_budget.base_url, "/v1/completions", body(f"pair{i}")) for i in range(2)]
    try:
        wait_until(lambda: len(compiles(long_budget)) == 2, "the two slow compiles never started")
        r = httpx.post(long_budget.url("/v1/chat/completions"), timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SMALL_SCHEMA}}})
        assert r.status_code == 200, r.text  # answered while both slow compiles still run
        assert len(compiles(long_budget)) == 2
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: compiles(long_budget) == [], "the slow compiles outlived their clients", timeout=15)


@pytest.mark.timeout(180)
def test_a_disconnect_cancels_its_compile(long_budget):
    sock = open_raw_request(long_budget.base_url, "/v1/completions", body("gone"))
    wait_until(lambda: len(compiles(long_budget)) == 1, "the compile never started")
    [pid] = compiles(long_budget)
    time.sleep(0.5)
    sock.close()
    left = time.monotonic()
    wait_until(lambda: not alive(pid), "the compile went on after its client left", timeout=15)
    assert time.monotonic() - left < 10  # the disconnect, not the request timeout (12 s) or the budget (60 s)


@pytest.mark.timeout(180)
def test_the_request_timeout_cancels_its_compile(long_budget):
    started = time.monotonic()
    r = httpx.post(long_budget.url("/v1/completions"), timeout=120, json=body("late"))
    waited = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "timeout" and "while its grammar compiled" in r.json()["error"]["message"]
    assert 11 < waited < 45 and int(r.headers["Retry-After"]) >= 12
    wait_until(lambda: compiles(long_budget) == [], "the compile outlived its request", timeout=15)


@pytest.mark.timeout(180)
def test_sigterm_while_a_compile_runs_exits_promptly_with_status_0(long_budget):
    sock = open_raw_request(long_budget.base_url, "/v1/completions", body("term"))
    try:
        wait_until(lambda: len(compiles(long_budget)) == 1, "the compile never started")
        family = descendants(long_budget.proc.pid)
        long_budget.signal()
        started = time.monotonic()
        try:
            status = long_budget.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within 30 s of SIGTERM while a grammar compiled")
        assert status == 0
        assert time.monotonic() - started < 20  # the 3 s drain and a few seconds of closing
        wait_until(lambda: not any(alive(pid) for pid in family), "a compile process outlived the server", timeout=10)
        assert "Traceback" not in long_budget.log
    finally:
        sock.close()


@pytest.mark.timeout(240)
def test_a_killed_server_leaves_no_compile_behind(start_server):
    server = start_server("--kv-cache-memory", "2MiB", env={"KVSERVE_GRAMMAR_COMPILE_TIMEOUT": "60"})
    warm_up(server)
    sock = open_raw_request(server.base_url, "/v1/completions", body("killed"))
    try:
        wait_until(lambda: len(compiles(server)) == 1, "the compile never started")
        family = descendants(server.proc.pid)
        server.kill()  # SIGKILL: no drain, no close(); the zygote sees its input end
        wait_until(lambda: not any(alive(pid) for pid in family), "a grammar process outlived a killed server",
                   timeout=15)
    finally:
        sock.close()
