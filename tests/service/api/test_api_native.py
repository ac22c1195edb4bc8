"""Native endpoints against a live tiny server: /generate (JSON and SSE), /tokenize, /detokenize, /health,
and the SSE framing of every streaming endpoint read byte for byte."""
from __future__ import annotations

import json
import re

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
    ref, lps = tiny_ref.greedy(ids, 10)
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "ignore_eos": True,
                                                                      "details": True, "top_n_tokens": 2}})
    assert r.status_code == 200
    body = r.json()
    assert body["generated_text"] == tiny_ref.text(ref)
    d = body["details"]
    assert [t["id"] for t in d["tokens"]] == ref and "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    assert (d["finish_reason"], d["generated_tokens"], d["prefill"]) == ("length", 10, [])
    for token, lp in zip(d["tokens"], lps):
        assert abs(token["logprob"] - float(lp[token["id"]])) < 1e-3 and token["special"] is False
    assert [[t["id"] for t in top] for top in d["top_tokens"]] == [lp.topk(2).indices.tolist() for lp in lps]


def test_generate_without_details_is_only_the_text_and_root_is_a_list(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert set(r.json()) == {"generated_text"}
    root = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert root.json() == [r.json()]


def test_generate_full_text_and_truncate(tiny_ref, http):
    ids = tiny_ref.encode("xyz")
    ref, _ = tiny_ref.greedy(ids, 4)
    r = http.post("/generate", json={"inputs": "xyz", "parameters": {"max_new_tokens": 4, "ignore_eos": True,
                                                                     "return_full_text": True}})
    assert r.json()["generated_text"] == "xyz" + tiny_ref.text(ref)
    long = "a long prompt that is cut to its last three tokens: xyz"
    r = http.post("/generate", json={"inputs": long, "parameters": {"max_new_tokens": 4, "ignore_eos": True,
                                                                    "truncate": 3, "details": True}})
    assert [t["id"] for t in r.json()["details"]["tokens"]] == ref


@pytest.mark.parametrize("path,body", [("/generate_stream", {}), ("/generate", {"stream": True}), ("/", {"stream": True})])
def test_generate_stream_is_tgi_events(tiny_ref, http, path, body):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 8)
    with http.stream("POST", path, json={"inputs": PROMPT, **body,
                                         "parameters": {"max_new_tokens": 8, "ignore_eos": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in read_sse(r.read().decode())]
    assert [e["token"]["id"] for e in events] == ref and [e["index"] for e in events] == list(range(1, 9))
    assert "".join(e["token"]["text"] for e in events) == tiny_ref.text(ref)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == tiny_ref.text(ref)
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 8, "seed": None,
                                     "input_length": len(ids)}


def test_generate_grammar_regex(http):
    r = http.post("/generate", json={"inputs": "Date:", "parameters": {
        "max_new_tokens": 20, "grammar": {"type": "regex", "value": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}, "details": True}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.json()["generated_text"])
    assert r.json()["details"]["finish_reason"] == "eos_token"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}),
])
def test_sse_framing_is_data_lines_and_blank_lines(http, path, body):
    with http.stream("POST", path, json=body) as r:
        raw = r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
    assert raw.endswith("data: [DONE]\n\n") == path.startswith("/v1/")  # TGI's stream has no [DONE]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block  # one data line per event, nothing else
    for block in blocks[:-2 if path.startswith("/v1/") else -1]:
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
