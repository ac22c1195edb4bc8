"""service.api.protocol without a server: body parsing, conversion to SamplingParams, logprob shapes, SSE framing."""
from __future__ import annotations

import json
import math

import pytest

from model.sampling_params import SamplingParams
from service.api.protocol import SSE_DONE, InvalidBody, error_body, parse_body, sse_event
from service.api.protocol_logprobs import MIN_LOGPROB, chat_logprobs, completion_logprobs
from service.api.protocol_native import GenerateRequest
from service.api.protocol_openai import (
    MAX_CHOICES,
    MAX_N,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
)
from service.engine.errors import RequestError
from service.engine.outputs import TokenLogprob


def parse(cls, body) -> object:
    return parse_body(cls, body if isinstance(body, bytes) else json.dumps(body).encode())


def invalid(cls, body) -> InvalidBody:
    with pytest.raises(InvalidBody) as info:
        parse(cls, body)
    return info.value


# ---- parsing ----

@pytest.mark.parametrize("raw", [b"{bad", b'{"prompt": "x",}', b"", b"\xff\xfe"])
def test_malformed_json_is_400_without_param(raw):
    err = invalid(CompletionRequest, raw)
    assert err.status == 400 and err.param is None and "malformed JSON" in str(err)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),       # strict: a string is not an int
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({}, "prompt"),
])
def test_wrong_types_are_400_naming_the_field(body, param):
    err = invalid(CompletionRequest, body)
    assert (err.status, err.param) == (400, param)
    assert param in str(err)


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": MAX_N + 1}, "n"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_bad_values_are_400_naming_the_field(body, param):
    err = invalid(CompletionRequest, body)
    assert (err.status, err.param) == (400, param)


def test_top_level_must_be_an_object():
    err = invalid(CompletionRequest, [1, 2])
    assert err.status == 400 and err.param is None and "JSON object" in str(err)


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages.0.role"),
    ([{"role": "user", "content": 5}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], "messages.0.content"),
    ([{"role": "user"}, {"content": "x"}], "messages.1.role"),
])
def test_chat_message_errors_name_the_message(messages, param):
    assert invalid(ChatCompletionRequest, {"messages": messages}).param == param


def test_unknown_fields_are_ignored():
    req = parse(CompletionRequest, {"prompt": "x", "user": "u", "some_future_field": {"a": 1}})
    assert req.prompt == "x"


@pytest.mark.parametrize("prompt,expected", [
    ("abc", ["abc"]),
    (["a", "b"], ["a", "b"]),
    ([5, 6, 7], [[5, 6, 7]]),
    ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_prompt_forms(prompt, expected):
    assert parse(CompletionRequest, {"prompt": prompt}).prompts() == expected


def test_prompts_times_n_is_capped():
    ok = parse(CompletionRequest, {"prompt": ["p"] * (MAX_CHOICES // 4), "n": 4})
    assert len(ok.prompts()) == MAX_CHOICES // 4
    with pytest.raises(RequestError) as info:
        parse(CompletionRequest, {"prompt": ["p"] * (MAX_CHOICES // 4 + 1), "n": 4}).prompts()
    assert info.value.param == "prompt" and str(MAX_CHOICES) in str(info.value)


def test_chat_content_parts_and_developer_role_flatten_for_the_template():
    req = parse(ChatCompletionRequest, {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
        {"role": "assistant", "content": None}]})
    assert req.template_messages() == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hello"},
                                       {"role": "assistant", "content": ""}]


# ---- conversion to SamplingParams ----

def test_completion_params_match_a_hand_built_sampling_params():
    req = parse(CompletionRequest, {
        "prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "min_p": 0.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "seed": 11,
        "stop": "END", "stop_token_ids": [2, 5], "ignore_eos": True, "logprobs": 3})
    expected = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=4, min_p=0.1, presence_penalty=0.5,
                              frequency_penalty=-0.5, repetition_penalty=1.2, seed=11, stop=("END",),
                              stop_token_ids=(2, 5), ignore_eos=True, logprobs=3)
    assert req.to_sampling_params(0) == expected
    # choice i gets seed + i: reproducible, yet n choices are not n copies
    assert req.to_sampling_params(2).seed == 13


def test_completion_defaults_are_openais():
    sp = parse(CompletionRequest, {"prompt": "x"}).to_sampling_params()
    assert sp == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0)
    assert parse(CompletionRequest, {"prompt": "x", "stop": ["a", "b"]}).to_sampling_params().stop == ("a", "b")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("logprobs", 21),
    ("top_k", -2),
])
def test_out_of_range_values_raise_request_error_naming_the_field(field, value):
    req = parse(CompletionRequest, {"prompt": "x", field: value})
    with pytest.raises(RequestError) as info:
        req.to_sampling_params()
    assert info.value.param == field and str(info.value).startswith(f"{field}=")


def test_empty_stop_string_is_refused_as_stop():
    with pytest.raises(RequestError) as info:
        parse(CompletionRequest, {"prompt": "x", "stop": [""]}).to_sampling_params()
    assert info.value.param == "stop"


def test_chat_max_tokens_defaults_to_the_room_left_and_prefers_max_completion_tokens():
    msgs = [{"role": "user", "content": "x"}]
    assert parse(ChatCompletionRequest, {"messages": msgs}).to_sampling_params(room=40).max_tokens == 40
    both = parse(ChatCompletionRequest, {"messages": msgs, "max_tokens": 5, "max_completion_tokens": 3})
    assert both.to_sampling_params(room=40).max_tokens == 3
    with pytest.raises(RequestError) as info:
        parse(ChatCompletionRequest, {"messages": msgs, "max_completion_tokens": 0}).to_sampling_params(room=40)
    assert info.value.param == "max_completion_tokens" and "max_completion_tokens=0" in str(info.value)


def test_chat_logprobs_bool_and_top_logprobs():
    msgs = [{"role": "user", "content": "x"}]
    assert parse(ChatCompletionRequest, {"messages": msgs}).to_sampling_params(9).logprobs is None
    assert parse(ChatCompletionRequest, {"messages": msgs, "logprobs": True}).to_sampling_params(9).logprobs == 0
    req = parse(ChatCompletionRequest, {"messages": msgs, "logprobs": True, "top_logprobs": 4})
    assert req.to_sampling_params(9).logprobs == 4
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 30}, "top_logprobs")):
        with pytest.raises(RequestError) as info:
            parse(ChatCompletionRequest, {"messages": msgs, **body}).to_sampling_params(9)
        assert info.value.param == param


def test_generate_is_greedy_unless_sampling_is_asked_for():
    assert parse(GenerateRequest, {"inputs": "x"}).to_sampling_params() == SamplingParams(max_tokens=100,
                                                                                           temperature=0.0, logprobs=0)
    sampled = parse(GenerateRequest, {"inputs": "x", "parameters": {"do_sample": True, "max_new_tokens": 3,
                                                                      "top_n_tokens": 2, "stop": ["."]}})
    assert sampled.to_sampling_params() == SamplingParams(max_tokens=3, temperature=1.0, logprobs=2, stop=(".",))
    assert parse(GenerateRequest, {"inputs": "x", "parameters": {"temperature": 0.7}}).to_sampling_params().temperature == 0.7
    assert parse(GenerateRequest, {"inputs": "x", "parameters": {"top_k": 5}}).to_sampling_params().temperature == 1.0
    regex = parse(GenerateRequest, {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}})
    assert regex.to_sampling_params().structured_output.value == "a+"


def test_generate_errors_use_tgi_names():
    with pytest.raises(RequestError) as info:
        parse(GenerateRequest, {"inputs": "x", "parameters": {"max_new_tokens": 0}}).to_sampling_params()
    assert info.value.param == "parameters.max_new_tokens" and str(info.value).startswith("parameters.max_new_tokens=0")
    assert invalid(GenerateRequest, {"inputs": "x", "parameters": {"top_k": "a"}}).param == "parameters.top_k"
    assert invalid(GenerateRequest, {"parameters": {}}).param == "inputs"


# ---- responses, logprobs, SSE ----

def fake_names(ids):
    return [f"<{i}>" for i in ids]


def test_completion_logprobs_shape():
    entries = [TokenLogprob(7, -0.5, [(7, -0.5), (9, -1.5)]), TokenLogprob(12, -math.inf, [])]
    lp = completion_logprobs(entries, fake_names, start_offset=3)
    assert lp.tokens == ["<7>", "<12>"]
    assert lp.token_logprobs == [-0.5, MIN_LOGPROB]  # -inf is not JSON
    assert lp.top_logprobs == [{"<7>": -0.5, "<9>": -1.5}, {}]
    assert lp.text_offset == [3, 3 + len("<7>")]
    json.loads(lp.model_dump_json())


def test_chat_logprobs_shape():
    lp = chat_logprobs([TokenLogprob(7, -0.25, [(7, -0.25), (8, -2.0)])], fake_names)
    assert lp.model_dump() == {"content": [{
        "token": "<7>", "logprob": -0.25, "bytes": list(b"<7>"),
        "top_logprobs": [{"token": "<7>", "logprob": -0.25, "bytes": list(b"<7>")},
                         {"token": "<8>", "logprob": -2.0, "bytes": list(b"<8>")}]}]}


def read_sse(stream: bytes) -> list[str]:
    """An independent reading of the event-stream format: events end at a blank line; `data:` lines join."""
    events = []
    for block in stream.decode().split("\n\n"):
        if block:
            lines = [line[len("data:"):].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
            events.append("\n".join(lines))
    return events


def test_sse_framing_round_trips_text_with_newlines():
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[
        ChatChunkChoice(index=0, delta=Delta(content="line1\n\nline2 \"q\" é"))])
    framed = sse_event(chunk) + sse_event({"a": 1}) + SSE_DONE
    assert framed.count(b"\n\n") == 3 and framed.endswith(b"data: [DONE]\n\n")
    events = read_sse(framed)
    assert json.loads(events[0])["choices"][0]["delta"] == {"content": "line1\n\nline2 \"q\" é"}
    assert json.loads(events[1]) == {"a": 1}
    assert events[2] == "[DONE]"


def test_chat_delta_omits_absent_fields():
    assert Delta(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}
    assert Delta(content="x").model_dump() == {"content": "x"}
    choice = json.loads(ChatChunkChoice(index=0, delta=Delta(content="x")).model_dump_json())
    assert choice == {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}


def test_error_body_is_openais_shape():
    assert error_body("bad", "invalid_request_error", "n", "c").model_dump() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "c"}}
