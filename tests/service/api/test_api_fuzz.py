"""Property-based fuzzing of every HTTP body against the shared live tiny server.

Hypothesis builds bodies for each endpoint from its real field names, each field either a
plausible value or junk of any JSON type (huge and non-finite numbers, wrong types, nested
objects), plus unknown keys. Whatever it sends, the answer is a 2xx or a 4xx with OpenAI's error
body; never a 5xx, a hang or a broken stream; and the server is healthy, with every KV block
back, afterwards. Derandomized and bounded (a fixed number of examples per endpoint) so CI time
stays under a minute.
"""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.hostile_schemas import hostile_fields
from tests.service.live_server import AUTH

EXAMPLES = 100

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=4), st.dictionaries(st.text(max_size=4),
                                                                                     st.integers(), max_size=2))
words = st.text(st.sampled_from("ab é東😀 <|>im_endstr\n"), max_size=24)
text = st.text(st.sampled_from("ab é東😀 <|>im_endstr\n"), min_size=1, max_size=24)
ids = st.lists(st.integers(-1, 300), max_size=8)


def mostly(good, other, one_in: int = 8):
    """`good` (one_of would pick each alternative equally often), `other` once in `one_in`."""
    return st.integers(1, one_in).flatmap(lambda i: other if i == 1 else good)


def field(good):
    """A plausible value most of the time, junk (of any type, in or out of range) otherwise."""
    return mostly(good, junk)


SAMPLING = {
    "model": field(st.sampled_from(["tiny", "tiny:native", "tiny:mqa"])),
    "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0.01, 1)), "top_k": field(st.integers(-1, 300)),
    "min_p": field(st.floats(0, 1)), "presence_penalty": field(st.floats(-2, 2)),
    "frequency_penalty": field(st.floats(-2, 2)), "repetition_penalty": field(st.floats(0.01, 3)),
    "seed": field(st.integers(-2**63, 2**64)), "stop": field(st.one_of(words, st.lists(words, max_size=5))),
    "stop_token_ids": field(st.lists(st.integers(-1, 300), max_size=3)), "ignore_eos": field(st.booleans()),
    "n": field(st.integers(1, 4)), "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "cache_salt": field(words), "user": field(words),
}
MESSAGE = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "developer", "tool"])),
                                 "content": field(st.one_of(words, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "text", "image_url"]), "text": words}),
                                     max_size=2)))})
BODIES = {
    "/v1/completions": {**SAMPLING, "prompt": field(st.one_of(text, st.lists(text, max_size=3), ids)),
                        "max_tokens": field(st.integers(1, 6)), "logprobs": field(st.integers(0, 20))},
    "/v1/chat/completions": {**SAMPLING, "messages": field(st.lists(MESSAGE, max_size=3)),
                             "max_tokens": field(st.integers(1, 6)), "max_completion_tokens": field(st.integers(1, 6)),
                             "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 20))},
    "/generate": {"inputs": field(text), "prompt": field(ids), "stream": field(st.booleans()),
                  "cache_salt": field(words), "model": field(st.just("tiny")),
                  "parameters": field(st.fixed_dictionaries({}, optional={
                      "max_new_tokens": field(st.integers(1, 6)), "do_sample": field(st.booleans()),
                      "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0.01, 1)),
                      "top_k": field(st.integers(-1, 300)), "repetition_penalty": field(st.floats(0.01, 3)),
                      "seed": field(st.integers(-2**63, 2**64)), "stop": field(st.lists(words, max_size=5)),
                      "details": field(st.booleans()), "top_n_tokens": field(st.integers(0, 20)),
                      "return_full_text": field(st.booleans())}))},
    "/tokenize": {"prompt": field(words), "messages": field(st.lists(MESSAGE, max_size=3)),
                  "add_special_tokens": field(st.booleans()), "add_generation_prompt": field(st.booleans()),
                  "model": field(st.sampled_from(["tiny", "nope"]))},
    "/detokenize": {"tokens": field(ids), "model": field(st.just("tiny"))},
}


REQUIRED = {"/v1/completions": "prompt", "/v1/chat/completions": "messages", "/generate": "inputs",
            "/tokenize": "prompt", "/detokenize": "tokens"}


def bodies(path: str):
    """Mostly objects that carry the endpoint's required field (so they reach validation, the
    engine and the answer), some without it, a few that are not objects at all."""
    fields, required = BODIES[path], REQUIRED[path]
    rest = {k: v for k, v in fields.items() if k != required}
    complete = st.fixed_dictionaries({required: fields[required]}, optional=rest)
    partial = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(st.text(max_size=6), junk, max_size=2)
    objects = st.builds(lambda k, e: {**e, **k}, mostly(complete, partial, 4), extra)
    return mostly(objects, junk, 10)


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120, headers=AUTH) as client:
        yield client


def check_answer(r: httpx.Response, body) -> None:
    assert r.status_code < 500, f"{r.status_code} for {body!r}: {r.text[:300]}"
    if r.status_code >= 400 and r.request.url.path in ("/generate", "/generate_stream", "/"):  # TGI's error body
        assert set(r.json()) == {"error", "error_type"} and r.json()["error"], r.text[:300]
    elif r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e.strip()]
        assert events and all(e.startswith("data: ") for e in events), r.text[:300]
        payloads = [e[6:] for e in events]
        if payloads[-1] != "[DONE]":  # TGI's stream ends with its last token event, which carries the details
            assert (json.loads(payloads[-1]).get("details") or {}).get("finish_reason") is not None, payloads[-1]
        for p in payloads:
            if p != "[DONE]":
                assert "error" not in json.loads(p) or json.loads(p)["error"] is None, p
    else:
        r.json()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", list(BODIES))
def test_any_body_is_answered_with_a_2xx_or_a_4xx(http, path):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bodies(path))
    def probe(body):
        raw = json.dumps(body).encode()  # NaN and Infinity as JSON's common extensions
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        check_answer(r, body)

    probe()


@pytest.mark.timeout(600)
def test_hostile_schemas_and_grammars_are_answered_with_a_2xx_or_a_4xx(http):
    """Issue 21's attacks, on both OpenAI endpoints, alone and beside other fields: refused (400) by the
    cheap checks or the compile budget, or compiled and answered; never a 5xx, never a hang."""
    corpus = hostile_fields()

    @settings(max_examples=len(corpus) * 2, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(range(len(corpus))), st.booleans(), st.fixed_dictionaries({}, optional={
        "n": st.integers(1, 2), "stream": st.booleans(), "temperature": st.floats(0, 1)}))
    def probe(index, chat, extra):
        field, value = corpus[index]
        body = {"max_tokens": 4, field: value, **extra}
        body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
        r = http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        check_answer(r, {field: str(value)[:80]})

    probe()


def test_the_server_is_healthy_after_the_fuzzing(server, http):
    assert http.get("/health").status_code == 200
    server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant="native", state="used")
    assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
