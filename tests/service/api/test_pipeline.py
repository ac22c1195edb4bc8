"""The one request pipeline: every request is validated once (by its engine), and every route's
errors are 4xx JSON bodies naming the field, /tokenize's chat-template refusals included."""
from __future__ import annotations

import httpx
import pytest

from service.engine.config import EngineConfig
from service.server import ServeOptions


@pytest.fixture
def served(serve_in_process):
    state, url = serve_in_process(ServeOptions(model="tiny", dtype="float32",
                                               engine=EngineConfig(kv_cache_memory=1 << 20)))
    engine = state.engines["native"]
    calls: list[int] = []
    validate = engine.validate

    def counting(prompt_ids, params):
        calls.append(len(prompt_ids))
        return validate(prompt_ids, params)

    engine.validate = counting  # type: ignore[method-assign]
    with httpx.Client(base_url=url, timeout=60) as http:
        yield http, calls


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "abc", "max_tokens": 2, "n": 3}),
    ("/v1/completions", {"prompt": ["abc", "de"], "max_tokens": 2, "n": 2, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2}),
    ("/generate", {"inputs": "abc", "parameters": {"max_new_tokens": 2}}),
])
def test_each_engine_request_is_validated_exactly_once(served, path, body):
    http, calls = served
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    assert len(calls) == prompts * body.get("n", 1)


@pytest.mark.parametrize("path, body, param, message", [
    ("/tokenize", {"messages": []}, "messages", "empty list of messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [1, 259]}, "tokens", "out of range [0, 258]"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least one message"),
    ("/v1/completions", {"prompt": [300], "max_tokens": 2}, "prompt", "out of range [0, 258]"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 100000}, "max_tokens", "must be in [1,"),
])
def test_every_route_answers_errors_as_4xx_naming_the_field(served, path, body, param, message):
    http, calls = served
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]


@pytest.mark.parametrize("body, message", [
    ({"parameters": {"max_new_tokens": 2}}, "inputs"),
    ({"inputs": "a", "parameters": {"max_new_tokens": 100000}}, "parameters.max_new_tokens"),
])
def test_tgi_routes_answer_errors_in_tgis_shape(served, body, message):
    http, _ = served
    for path in ("/generate", "/generate_stream", "/"):
        r = http.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error_type"] == "validation" and message in r.json()["error"]
