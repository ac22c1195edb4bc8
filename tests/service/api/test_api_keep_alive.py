"""SSE keep-alive on a server in this process, its engine thread held at the end of a step for as
long as the test wants (a long prefill, deterministically): a streaming answer starts as soon as
the engine has accepted the request, sends `: keep-alive` comments until its first token, then
streams exactly what the JSON answer holds; what the engine refuses while streams wait (a full
queue, a bad value) is still a status code with an error body, never a started stream.
Every wait is on an event (the engine held, a comment seen), none on a sleep."""
from __future__ import annotations

import json
import threading
from contextlib import ExitStack

import httpx
import pytest

from service.engine.config import EngineConfig
from service.engine.observer import EngineObserver
from service.server import ServeOptions
from tests.service.live_server import WAIT_TIMEOUT_S

KEEP_ALIVE = ": keep-alive"
MESSAGES = [{"role": "user", "content": "hold on"}]
STREAMS = [
    ("/v1/completions", {"prompt": "hold on", "max_tokens": 3, "temperature": 0, "stream": True}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}),
    ("/generate_stream", {"inputs": "hold on", "parameters": {"max_new_tokens": 3}}),
]


class HeldSteps(EngineObserver):
    """Holds the engine thread at the end of every step (before the step's outputs are delivered)
    until `released` is set."""

    def __init__(self) -> None:
        self.holding = threading.Event()  # the engine thread is (or was) held
        self.released = threading.Event()

    def on_step(self, **_) -> None:
        if not self.released.is_set():
            self.holding.set()
            self.released.wait(WAIT_TIMEOUT_S)


@pytest.fixture
def held(serve_in_process):
    state, url = serve_in_process(ServeOptions(model="tiny", dtype="float32", engine=EngineConfig(
        kv_cache_memory=1 << 20, max_num_seqs=1, max_queue=1)))
    state.sse_keep_alive_s = 0.02
    gate = HeldSteps()
    state.engines["native"].observer = gate
    with httpx.Client(base_url=url, timeout=WAIT_TIMEOUT_S) as http:
        yield http, gate
    gate.released.set()


def data_events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def streamed_text(path: str, events: list[str]) -> str:
    if path == "/generate_stream":
        return json.loads(events[-1])["generated_text"]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    if path == "/v1/completions":
        return "".join(c["choices"][0]["text"] for c in chunks)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def answered_text(http: httpx.Client, path: str, body: dict) -> str:
    if path == "/generate_stream":
        return http.post("/generate", json=body).json()["generated_text"]
    choice = http.post(path, json={**body, "stream": False}).json()["choices"][0]
    return choice["text"] if path == "/v1/completions" else choice["message"]["content"]


@pytest.mark.parametrize("path, body", STREAMS)
def test_a_stream_starts_at_once_and_keeps_alive_until_its_first_token(held, path, body):
    http, gate = held
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert gate.holding.wait(WAIT_TIMEOUT_S)  # its first step is done, its outputs held back
        lines = r.iter_lines()
        before: list[str] = []
        while before.count(KEEP_ALIVE) < 2:
            before.append(next(lines))
        gate.released.set()
        after = list(lines)
    for event in data_events(before):  # only chat's opening chunk (the role, no text) may come first
        assert path == "/v1/chat/completions" and json.loads(event)["choices"][0]["delta"] == {"role": "assistant",
                                                                                               "content": ""}
    assert {line for line in before + after if line and not line.startswith("data:")} == {KEEP_ALIVE}
    events = data_events(before + after)
    assert events[-1] == "[DONE]" or path == "/generate_stream"
    text = streamed_text(path, events)
    assert text == answered_text(http, path, body) and text


def test_while_streams_wait_refusals_are_still_status_codes(held):
    http, gate = held
    path, body = STREAMS[0]
    with ExitStack() as stack:
        running = stack.enter_context(http.stream("POST", path, json=body))
        assert running.status_code == 200
        assert gate.holding.wait(WAIT_TIMEOUT_S)  # it is being computed; the engine cannot admit more
        queued = stack.enter_context(http.stream("POST", path, json=body))
        assert queued.status_code == 200  # accepted into the queue (max_queue=1): its stream has started
        full = http.post(path, json=body)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        tgi_full = http.post("/generate_stream", json=STREAMS[2][1])
        assert tgi_full.status_code == 503 and tgi_full.json()["error_type"] == "overloaded"
        bad = http.post(path, json={**body, "max_tokens": 100000})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        gate.released.set()
        for r in (running, queued):
            events = data_events(list(r.iter_lines()))
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
