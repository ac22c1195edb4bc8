"""The Responses API (`POST /v1/responses`, stateless) with the openai client's responses.create and
responses.stream against live servers: text equal to the same chat completion, instructions, a
json_schema text format, streamed events that add up to the final response, function tools on
SmolLM2, and the stateful fields refused with a clear 400."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.service.live_server import API_KEY, LiveServer

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def client(shared_server):
    return openai.OpenAI(base_url=shared_server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120)


def chat_text(client, messages, **kwargs) -> str:
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs).choices[0].message.content


def test_create_equals_the_same_chat_completion(client):
    r = client.responses.create(model="tiny", input="Hello there", instructions="Be brief.", max_output_tokens=6,
                                temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    want = chat_text(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                     max_tokens=6)
    assert r.output_text == want and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_input_items_and_json_schema_format(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Is the sky blue?"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Maybe."}]},
             {"role": "user", "content": "Answer in JSON."}]
    r = client.responses.create(model="tiny", input=items, max_output_tokens=40, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "yn", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.status == "completed"


def test_stream_events_add_up_to_the_final_response(client):
    kwargs = dict(model="tiny", input="Blocks of sixteen", max_output_tokens=40, temperature=0,
                  text={"format": {"type": "json_schema", "name": "yn", "schema": SCHEMA}})
    with client.responses.stream(**kwargs) as stream:
        kinds, deltas = [], []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    whole = client.responses.create(**kwargs)
    assert "".join(deltas) == final.output_text == whole.output_text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)
    # cut by max_output_tokens: the stream ends with response.incomplete, as OpenAI's does
    with client.responses.stream(model="tiny", input="Blocks", max_output_tokens=3, temperature=0) as stream:
        assert [event.type for event in stream][-1] == "response.incomplete"


@pytest.mark.parametrize("kwargs,param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": [{"type": "image", "url": "x"}]}, "input.0.type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_stateful_and_bad_fields_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**{"model": "tiny", "input": "hi", **kwargs})
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_function_tools_on_smollm2(smollm2_gguf_path):
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                             "required": ["city"], "additionalProperties": False}}]
    with LiveServer("--model", str(smollm2_gguf_path), "--served-model-name", "smollm2", "--kv-cache-memory", "64MiB",
                    "--max-model-len", "1400") as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=300)
        kwargs = dict(model="smollm2", input="What is the weather in Paris?", tools=tools, tool_choice="required",
                      parallel_tool_calls=False, max_output_tokens=80, temperature=0)
        r = client.responses.create(**kwargs)
        (call,) = [o for o in r.output if o.type == "function_call"]
        assert call.name == "get_weather" and r.status == "completed"
        jsonschema.validate(json.loads(call.arguments), tools[0]["parameters"])
        with client.responses.stream(**kwargs) as stream:
            final = stream.get_final_response()
        (streamed,) = [o for o in final.output if o.type == "function_call"]
        assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
        # the call's result goes back as input items, and the conversation continues
        follow = client.responses.create(model="smollm2", tools=tools, tool_choice="none", max_output_tokens=20,
                                         input=[{"role": "user", "content": "What is the weather in Paris?"},
                                                {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                                 "arguments": call.arguments},
                                                {"type": "function_call_output", "call_id": call.call_id,
                                                 "output": "sunny, 21 C"}])
        assert follow.output_text
