"""Tool-call formats on their own: the text a call is written as parses back to it, streamed text
splits into content and calls exactly as the whole text does, earlier calls and tool results render
in the format, and the request's tool fields are checked together (bad ones: 400 over HTTP)."""
from __future__ import annotations

import json
import random

import httpx
import pytest

from service.api.protocol_tools import ToolFields
from service.api.tool_calls import FORMATS, template_messages
from service.api.tool_stream import ToolAnswer
from service.engine.errors import RequestError
from tests.service.live_server import AUTH

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
       "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_calls_parse_back_and_text_around_them_is_content(name):
    fmt = FORMATS[name]
    calls = [("get_weather", {"city": "Paris {x}"}), ("add", {"a": 1, "b": [2, {"c": "}"}]})]
    text = "Let me check. " + "\n".join(fmt.call_text(n, a) for n, a in calls) + " Done."
    content, parsed = fmt.parse(text)
    assert [(n, json.loads(a)) for n, a in parsed] == calls
    assert " ".join(content.split()) == "Let me check. Done."
    unfinished = "Sure " + fmt.call_text("add", {"a": 1})[:-3]
    assert fmt.parse(unfinished) == (unfinished, [])  # an unfinished call is text


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("calls_only", [False, True])
def test_streamed_text_splits_like_the_whole(name, calls_only):
    fmt = FORMATS[name]
    text = ("" if calls_only else "Hmm <tool x. ") + fmt.call_text("get_weather", {"city": "Oslo"}) + "\n" + \
        fmt.call_text("add", {"a": 2, "b": 3}) + ("" if calls_only else " bye")
    answer = ToolAnswer(fmt, calls_only)
    want_content, want_calls = answer.message(text)
    rng = random.Random(0)
    for _ in range(20):
        stream, content, deltas, pos = answer.stream(), "", [], 0
        while pos < len(text):
            step = rng.randint(1, 7)
            piece, calls = stream.push(text[pos:pos + step])
            content, deltas, pos = content + piece, deltas + calls, pos + step
        content += stream.finish()
        if calls_only:
            assert content == "" and want_content is None
        else:
            assert " ".join(content.split()) == " ".join(want_content.split()) == "Hmm <tool x. bye"
        firsts = [d for d in deltas if d.id is not None]
        assert [(d.index, d.function.name, d.function.arguments) for d in firsts] == \
            [(i, c.function.name, "") for i, c in enumerate(want_calls)]
        assert [d.function.arguments for d in deltas if d.id is None] == [c.function.arguments for c in want_calls]


def test_history_renders_in_the_format_and_natively():
    fmt = FORMATS["hermes"]
    tools = ToolFields.model_validate({"tools": [WEATHER]}).tool_request()
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    out, variables = template_messages(messages, tools, fmt, native=False)
    assert variables == {} and out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == fmt.call_text("get_weather", {"city": "Oslo"})
    assert out[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}
    out, variables = template_messages(messages, tools, fmt, native=True)
    assert variables["tools"][0]["function"]["name"] == "get_weather" and out[0]["role"] == "user"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"} and out[2]["tool_call_id"] == "call_1"


@pytest.mark.parametrize("body,needle", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": [WEATHER, WEATHER]}, "declared twice"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "get_weather"),
])
def test_tool_fields_are_checked_together(body, needle):
    with pytest.raises(RequestError, match=needle):
        ToolFields.model_validate(body).tool_request()


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_are_400_over_http(shared_server, body, param):
    r = httpx.post(shared_server.url("/v1/chat/completions"), headers=AUTH, timeout=60,
                   json={"messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_cli_offers_every_format():
    from service.cli import TOOL_CALL_FORMATS
    assert set(TOOL_CALL_FORMATS) == set(FORMATS)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("choice,parallel,text_ok", [("required", False, False), ("add", True, False), ("auto", True, True)])
def test_the_grammar_takes_valid_calls_and_refuses_the_rest(tiny, name, choice, parallel, text_ok):
    from service.engine.structured_output import GrammarCompiler

    fmt = FORMATS[name]
    _, tok = tiny
    body = {"tools": [WEATHER, ADD], "parallel_tool_calls": parallel,
            "tool_choice": choice if choice != "add" else {"type": "function", "function": {"name": "add"}}}
    tools = ToolFields.model_validate(body).tool_request()
    spec = fmt.structural_tag(tools)
    compiler = GrammarCompiler(tok, tok.vocab_size)

    def accepts(text: str) -> bool:
        matcher = compiler.new_matcher(compiler.compile(spec), spec)
        return all(matcher.accept_token(t) for t in tok.encode(text, add_special_tokens=False)) and \
            matcher.accept_token(min(tok.eos_token_ids)) and matcher.is_terminated()

    add = fmt.call_text("add", {"a": 1, "b": 2})
    assert accepts(add)
    assert not accepts(fmt.call_text("add", {"a": "one", "b": 2}))           # arguments off the schema
    assert not accepts(fmt.call_text("multiply", {"a": 1, "b": 2}))          # an undeclared function
    assert accepts("Just text.") is text_ok
    weather = fmt.call_text("get_weather", {"city": "Oslo"})
    assert accepts(weather) is (choice != "add")
    compiler.close()


def test_arguments_never_take_properties_the_schema_does_not_name(tiny):
    """OpenAI's `strict` holds whether it is sent or not (the grammar's JSON is xgrammar's strict mode)."""
    from service.engine.structured_output import GrammarCompiler

    fmt, (_, tok) = FORMATS["hermes"], tiny
    compiler = GrammarCompiler(tok, tok.vocab_size)
    for strict in (None, False, True):
        tool = {"type": "function", "function": {**ADD["function"], **({} if strict is None else {"strict": strict})}}
        spec = fmt.structural_tag(ToolFields.model_validate({"tools": [tool], "tool_choice": "required"}).tool_request())
        matcher = compiler.new_matcher(compiler.compile(spec), spec)
        text = fmt.call_text("add", {"a": 1, "b": 2, "c": 3})
        assert not all(matcher.accept_token(t) for t in tok.encode(text, add_special_tokens=False))
    compiler.close()
