"""TGI compatibility of the OpenAI routes, through huggingface_hub's InferenceClient against the
shared live tiny server: chat_completion with its placeholder model name ("dummy"), a JSON schema
sent in TGI's grammar shape (`response_format: {"type": "json_object", "value": schema}`), TGI's
other shapes (json, regex), and `GET /info` (get_endpoint_info). An OpenAI client naming a model
that is not served still gets 404."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.service.live_server import API_KEY, AUTH, SHARED_MAX_MODEL_LEN

hub = pytest.importorskip("huggingface_hub")
MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "level": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["answer", "level"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(shared_server):
    return hub.InferenceClient(base_url=shared_server.base_url, api_key=API_KEY, timeout=60)


def test_chat_completion_with_the_default_placeholder_model(shared_server, client, tiny_ref):
    out = client.chat_completion(MESSAGES, max_tokens=5, temperature=0)
    ref, _ = tiny_ref.greedy(tiny_ref.chat_ids(MESSAGES), 5, ignore_eos=False)
    assert out.choices[0].message.content == tiny_ref.text(ref)
    assert out.model == "tiny:native"  # the served id, not the placeholder


def test_schema_in_tgis_grammar_shape_is_honoured(client):
    for _ in range(3):
        out = client.chat_completion(MESSAGES, max_tokens=40, temperature=1.0,
                                     response_format={"type": "json_schema",
                                                      "json_schema": {"name": "a", "schema": SCHEMA}})
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("fmt,check", [
    ({"type": "json", "value": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ({"type": "json_object", "value": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ({"type": "regex", "value": "[a-f0-9]{6}"}, lambda t: re.fullmatch("[a-f0-9]{6}", t) or pytest.fail(t)),
])
def test_tgi_grammar_shapes_over_http(shared_server, fmt, check):
    body = {"model": "tgi", "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "response_format": fmt}
    r = httpx.post(shared_server.url("/v1/chat/completions"), json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    check(r.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("fmt,needle", [
    ({"type": "regex"}, "needs a value"),
    ({"type": "regex", "value": {"a": 1}}, "needs a string"),
    ({"type": "json_schema", "value": SCHEMA}, "type must be json_object, json or regex"),
    ({"type": "json", "value": {"type": "objekt"}}, "invalid JSON schema"),
])
def test_bad_tgi_grammar_shapes_are_400(shared_server, fmt, needle):
    body = {"messages": MESSAGES, "max_tokens": 4, "response_format": fmt}
    r = httpx.post(shared_server.url("/v1/chat/completions"), json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "response_format.value"


def test_get_endpoint_info(shared_server):
    # hub 2.x reads /info only for its "hf-inference" provider (a URL as model selects no provider)
    client = hub.InferenceClient(shared_server.base_url, provider="hf-inference", api_key=API_KEY, timeout=60)
    info = client.get_endpoint_info()
    assert info["model_id"] == "tiny:native" and info["max_total_tokens"] == SHARED_MAX_MODEL_LEN
    assert info["max_input_tokens"] == SHARED_MAX_MODEL_LEN - 1 and info["model_dtype"] == "torch.float32"
    assert info["model_device_type"] == "cpu" and info["max_stop_sequences"] == 4


def test_placeholders_select_the_default_but_unserved_models_are_404(shared_server):
    oai = openai.OpenAI(base_url=shared_server.url("/v1"), api_key=API_KEY, max_retries=0)
    for name in ("tgi", "dummy"):
        assert oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2).model == "tiny:native"
    for name in ("gpt-4o", "TGI", "dummy:native"):
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2)
