"""Native endpoints against a live tiny server: /generate (JSON and SSE), /tokenize, /detokenize, /health,
and the SSE framing of every streaming endpoint read byte for byte."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.service.live_server import AUTH, SHARED_MAX_MODEL_LEN, read_sse

PROMPT = "Blocks of sixteen tokens"


@pytest.fixture(scope="module")
def http(shared_server):
    with httpx.Client(base_url=shared_server.base_url, timeout=60, headers=AUTH) as c:
        yield c


def test_health(http):
    r = http.get("/health", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json() == {"status": "ok", "variants": ["native"]}


def test_generate_greedy_tokens_and_details(tiny_ref, http):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 10)
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "ignore_eos": True,
                                                                      "details": True}})
    assert r.status_code == 200
    body = r.json()
    assert body["generated_text"] == tiny_ref.text(ref)
    d = body["details"]
    assert d["token_ids"] == ref and [t["id"] for t in d["tokens"]] == ref
    assert (d["finish_reason"], d["prompt_tokens"], d["generated_tokens"]) == ("length", len(ids), 10)
    t = d["timings"]
    assert 0 <= t["queue_time_s"] <= t["ttft_s"] <= t["e2e_s"]


def test_generate_without_details_is_only_the_text(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert set(r.json()) == {"generated_text"}


def test_generate_from_token_ids_and_full_text(tiny_ref, http):
    ids = tiny_ref.encode("xyz")
    ref, _ = tiny_ref.greedy(ids, 4)
    r = http.post("/generate", json={"prompt": ids, "parameters": {"max_new_tokens": 4, "ignore_eos": True,
                                                                   "return_full_text": True, "details": True}})
    assert r.json()["generated_text"] == "xyz" + tiny_ref.text(ref)
    assert r.json()["details"]["token_ids"] == ref


def test_generate_stream(tiny_ref, http):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 8)
    with http.stream("POST", "/generate", json={"inputs": PROMPT, "stream": True,
                                                "parameters": {"max_new_tokens": 8, "ignore_eos": True,
                                                               "details": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r.read().decode())
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert [t for p in payloads for t in p["token_ids"]] == ref
    assert "".join(p["text"] for p in payloads) == tiny_ref.text(ref)
    assert all(p["generated_text"] is None and p["finish_reason"] is None for p in payloads[:-1])
    assert payloads[-1]["generated_text"] == tiny_ref.text(ref) and payloads[-1]["finish_reason"] == "length"
    assert payloads[-1]["details"]["token_ids"] == ref


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}),
    ("/generate", {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 6}}),
])
def test_sse_framing_is_data_lines_and_blank_lines_ending_with_done(http, path, body):
    with http.stream("POST", path, json=body) as r:
        raw = r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block  # one data line per event, nothing else
    for block in blocks[:-2]:
        json.loads(block[len("data: "):])


def test_tokenize_and_detokenize_round_trip(tiny_ref, http):
    tokenizer = tiny_ref.tokenizer
    text = "héllo wörld ☃"
    r = http.post("/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == SHARED_MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    msgs = [{"role": "user", "content": "hi"}]
    assert http.post("/tokenize", json={"messages": msgs}).json()["tokens"] == tiny_ref.chat_ids(msgs)
    assert http.post("/tokenize", json={"model": "tiny:native", "prompt": "a"}).status_code == 200
