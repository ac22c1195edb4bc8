"""Tool calling on the real SmolLM2-135M (whose template has no tool support: the default Hermes
format) behind the live server, with the unmodified client libraries: the openai client (required,
named, auto, streamed deltas, a conversation carrying earlier calls and tool results), LangChain's
bind_tools and with_structured_output(method="function_calling"), and litellm. Required and named
calls parse into the declared arguments every time (checked with jsonschema)."""
from __future__ import annotations

import json
import os

import jsonschema
import openai
import pytest

from tests.service.live_server import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                  "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}
ADD_PARAMS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}
QUESTIONS = ["What is the weather in Paris?", "Add 2 and 40.", "Is it raining in Tokyo right now?",
             "What is 17 plus 25?", "Tell me the temperature in Oslo in fahrenheit.", "Sum 3 and 4 please."]


@pytest.fixture(scope="module")
def server(smollm2_gguf_path):
    with LiveServer("--model", str(smollm2_gguf_path), "--served-model-name", "smollm2", "--kv-cache-memory", "64MiB",
                    "--max-model-len", "1400") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=300)


def ask(client, question, **kwargs):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                          tools=TOOLS, max_tokens=120, temperature=0.7, seed=0, **kwargs).choices[0]


def check_calls(choice, names=None):
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and calls and choice.message.content is None, choice
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def test_required_and_named_calls_always_parse_into_the_declared_arguments(client):
    for question in QUESTIONS:
        check_calls(ask(client, question, tool_choice="required", parallel_tool_calls=False))
        (call,) = check_calls(ask(client, question, tool_choice={"type": "function", "function": {"name": "add"}}),
                              {"add"})


def test_streamed_tool_call_deltas_add_up_to_the_json_answer(client):
    kwargs = dict(tool_choice="required", parallel_tool_calls=False)
    whole = check_calls(ask(client, QUESTIONS[0], **kwargs))
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            tools=TOOLS, max_tokens=120, temperature=0.7, seed=0, stream=True, **kwargs)
    names, arguments, finish = {}, {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.id:
                    names[delta.index] = delta.function.name
                arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
    assert finish == "tool_calls"
    assert [(names[i], arguments[i]) for i in sorted(names)] == [(c.function.name, c.function.arguments) for c in whole]


def test_auto_answers_text_or_valid_calls_and_a_conversation_with_tool_results_continues(client):
    choice = ask(client, QUESTIONS[1], tool_choice="auto")
    if choice.message.tool_calls:
        check_calls(choice)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
    call = check_calls(ask(client, QUESTIONS[0], tool_choice="required", parallel_tool_calls=False))[0]
    messages = [{"role": "user", "content": QUESTIONS[0]},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=30, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Current weather in a city."""
        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    llm = langchain_openai.ChatOpenAI(base_url=server.url("/v1"), api_key="unused", model="smollm2", max_tokens=120,
                                      temperature=0.7, seed=0)
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("What is the weather in Rome?")
    (call,) = message.tool_calls
    assert call["name"] == "Weather" and Weather.model_validate(call["args"])
    result = llm.with_structured_output(Weather, method="function_calling").invoke("Weather in Madrid?")
    assert isinstance(result, Weather)


def test_litellm_tool_calls(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    response = litellm.completion(model="openai/smollm2", api_base=server.url("/v1"), api_key="unused",
                                  messages=[{"role": "user", "content": "Add 5 and 6."}], tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=120)
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and response.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), ADD_PARAMS)
