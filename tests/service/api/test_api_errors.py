"""Bad input and auth against the shared live tiny server (started with --api-key): every error a client can cause
is its 4xx with OpenAI's JSON error body naming the field, counted as a rejection; never a 500."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.service.live_server import API_KEY as KEY
from tests.service.live_server import AUTH, SHARED_MAX_MODEL_LEN

MAX_MODEL_LEN = SHARED_MAX_MODEL_LEN
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers=AUTH) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "<any>":
        assert body["error"]["param"] == param, body
    return body["error"]


def rejected(server, reason: str) -> float:
    return server.metric("kvserve_requests_rejected_total", variant="native", reason=reason)


# ---- auth ----

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"), ("POST", "/generate"),
                                         ("POST", "/tokenize"), ("POST", "/detokenize")])
def test_protected_routes_need_the_bearer_key(server, method, path, headers):
    before = rejected(server, "unauthorized")
    r = httpx.request(method, server.url(path), headers=headers, json={"prompt": "x"}, timeout=30)
    if path == "/generate":  # TGI's route: TGI's error body
        assert r.status_code == 401 and "API key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    else:
        err = assert_error(r, 401)
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert rejected(server, "unauthorized") == before + 1


def test_right_key_works_and_probes_stay_open(server, http):
    assert http.get("/v1/models").status_code == 200
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/metrics")).status_code == 200


def test_openai_client_with_and_without_the_key(server):
    with openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0) as good:
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    with openai.OpenAI(base_url=server.url("/v1"), api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=2)


# ---- bad input: (path, body, status, param, rejection reason) ----

TOO_LONG_PROMPT = "y" * (MAX_MODEL_LEN + 5)  # the byte tokenizer: one token per ASCII byte
CASES = [
    ("/v1/completions", b"{not json", 400, None, "invalid"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "invalid"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "invalid"),
    ("/v1/completions", {"prompt": TOO_LONG_PROMPT}, 400, "prompt", "too_long"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "too_long"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens", "invalid"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "invalid"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "invalid"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "invalid"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "invalid"),
    ("/v1/completions", {"prompt": [5, 9999]}, 400, "prompt", "invalid"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", "invalid"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids", "invalid"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "invalid"),
    ("/v1/completions", {"prompt": "x", "model": "tiny:mqa"}, 404, "model", "invalid"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content", "invalid"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG_PROMPT}]}, 400, "messages",
     "too_long"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": -0.5}, 400, "temperature", "invalid"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     400, "response_format.json_schema.schema", "invalid"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(["}, 400, "guided_regex", "invalid"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, 400, "guided_choice", "invalid"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format.type", "invalid"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", "invalid"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools.0.function", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "tool_choice": "required"}, 400, "tool_choice", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "continue_final_message": True}, 400, "continue_final_message", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs", "invalid"),
    ("/v1/chat/completions", {"messages": MSG, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "structured_outputs", "invalid"),
    ("/tokenize", {}, 400, "prompt", "invalid"),
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens", "invalid"),
    ("/v1/models/gpt-4", None, 404, "model", "invalid"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "invalid"),
]


@pytest.mark.parametrize("path,body,status,param,reason", CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_4xx_naming_the_field(server, http, path, body, status, param, reason):
    before = rejected(server, reason)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = assert_error(http.get(path) if body is None else http.post(path, **kwargs), status, param)
    assert err["type"] == "invalid_request_error"
    if param:
        assert param.split(".")[-1] in err["message"]
    assert rejected(server, reason) == before + 1


# ---- TGI's routes answer TGI's error body: {"error", "error_type"} ----

TGI_CASES = [
    ({"parameters": {}}, "inputs", "invalid"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens", "invalid"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 500}}, "parameters.max_new_tokens", "too_long"),
    ({"inputs": "x", "parameters": {"top_p": 2}}, "parameters.top_p", "invalid"),
    ({"inputs": "x", "parameters": {"temperature": "warm"}}, "parameters.temperature", "invalid"),
    ({"inputs": TOO_LONG_PROMPT}, "inputs", "too_long"),
    ({"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of", "invalid"),
    ({"inputs": "x", "parameters": {"watermark": True}}, "parameters.watermark", "invalid"),
    ({"inputs": "x", "stream": True, "parameters": {"decoder_input_details": True}}, "parameters.decoder_input_details",
     "invalid"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(["}}}, "parameters.grammar.value", "invalid"),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("body,param,reason", TGI_CASES, ids=[c[1] for c in TGI_CASES])
def test_tgi_errors_are_tgi_shaped_and_name_the_field(server, http, path, body, param, reason):
    before = rejected(server, reason)
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "validation"
    assert param.split(".")[-1] in r.json()["error"]
    assert rejected(server, reason) == before + 1


def test_too_long_names_the_limit(http):
    err = assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": MAX_MODEL_LEN}), 400)
    assert err["code"] == "context_length_exceeded" and str(MAX_MODEL_LEN) in err["message"]


def test_oversized_body_is_413(server, http):
    before = rejected(server, "invalid")
    big = b'{"prompt": "' + b"z" * (5 << 20) + b'"}'
    assert_error(http.post("/v1/completions", content=big), 413)
    assert rejected(server, "invalid") == before + 1
    assert http.get("/health").status_code == 200


def test_unknown_route_and_wrong_method(http):
    err = assert_error(http.get("/v2/everything"), 404)
    assert "/v2/everything" in err["message"]
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.delete("/health"), 405)


def test_the_server_still_serves_after_all_that(http):
    r = http.post("/v1/completions", json={"prompt": "still", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
