"""The official `openai` client against a live tiny server: completions and chat, streaming and not,
usage, finish reasons, n, logprobs, stop. Greedy answers must equal the no-cache reference forward."""
from __future__ import annotations

import json
import math
import re

import openai
import pytest

from tests.service.live_server import API_KEY, SHARED_MAX_MODEL_LEN

PROMPT = "The paged KV cache"
MAX_MODEL_LEN = SHARED_MAX_MODEL_LEN
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(shared_server):
    with openai.OpenAI(base_url=shared_server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def test_models_lists_model_colon_variant(client):
    assert [m.id for m in client.models.list().data] == ["tiny:native"]
    assert client.models.list().data[0].max_model_len == MAX_MODEL_LEN


@pytest.mark.parametrize("model", ["tiny", "tiny:native"])
def test_completion_greedy_equals_reference(tiny_ref, client, model):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 12)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model and r.id.startswith("cmpl-")
    assert len(r.choices) == 1
    assert r.choices[0].text == tiny_ref.text(ref)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_from_token_ids_and_several_prompts(tiny_ref, client):
    first, second = tiny_ref.encode("abc"), tiny_ref.encode("a longer second prompt")
    r = client.completions.create(model="tiny", prompt=[first, second], max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [tiny_ref.text(tiny_ref.greedy(p, 5)[0]) for p in (first, second)]
    assert r.usage.prompt_tokens == len(first) + len(second) and r.usage.completion_tokens == 10


def test_completion_stream_equals_non_stream_and_ends_with_usage(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_chat_greedy_equals_reference(tiny_ref, client):
    ids = tiny_ref.chat_ids(MESSAGES)
    ref, _ = tiny_ref.greedy(ids, 9)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tiny_ref.text(ref)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 9)


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_MODEL_LEN
    assert r.choices[0].finish_reason == "length"


def test_chat_stream(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_greedy_choices_are_each_the_reference(tiny_ref, client):
    ids = tiny_ref.encode(PROMPT)
    expected = tiny_ref.text(tiny_ref.greedy(ids, 6)[0])
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, n=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert [c.text for c in r.choices] == [expected] * 3
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 18  # the prompt is counted once


def test_n_seeded_samples_are_reproducible_and_streamed_per_index(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, n=2, seed=1234,
                  extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # choice i samples with seed + i
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in a.choices]


def test_completion_logprobs_equal_the_reference_log_softmax(tiny_ref, client):
    ids = tiny_ref.encode(PROMPT)
    ref, ref_lps = tiny_ref.greedy(ids, 5)
    tokenizer = tiny_ref.tokenizer
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == tokenizer.convert_ids_to_tokens(ref)
    for chosen, got, top, lps in zip(ref, lp.token_logprobs, lp.top_logprobs, ref_lps):
        assert math.isclose(got, float(lps[chosen]), abs_tol=1e-3)
        best = lps.topk(3)
        assert list(top) == tokenizer.convert_ids_to_tokens(best.indices.tolist())
        assert all(math.isclose(top[name], float(v), abs_tol=1e-3)
                   for name, v in zip(top, best.values.tolist()))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_equal_the_reference_log_softmax(tiny_ref, client):
    ids = tiny_ref.chat_ids(MESSAGES)
    ref, ref_lps = tiny_ref.greedy(ids, 4)
    tokenizer = tiny_ref.tokenizer
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == tokenizer.convert_ids_to_tokens(ref)
    for item, chosen, lps in zip(content, ref, ref_lps):
        assert math.isclose(item.logprob, float(lps[chosen]), abs_tol=1e-3)
        assert item.bytes == list(tokenizer.token_bytes([chosen])[0])
        assert [t.token for t in item.top_logprobs] == tokenizer.convert_ids_to_tokens(lps.topk(2).indices.tolist())


def test_stop_string_cuts_the_text(tiny_ref, client):
    ids = tiny_ref.encode(PROMPT)
    text = tiny_ref.text(tiny_ref.greedy(ids, 24)[0])
    printable = [i for i in range(4, len(text) - 2) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2]]
    assert printable, f"no usable stop string in {text!r}"
    stop = text[printable[0]:printable[0] + 2]
    for stop_arg in (stop, [stop, "never-generated-\u2603"]):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop_arg,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == text[:text.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_stop_token_ids_end_with_stop(tiny_ref, client):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 10)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [ref[3]]})
    cut = ref.index(ref[3])
    assert r.choices[0].text == tiny_ref.text(ref[:cut])  # the stop token's text is not returned
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut + 1


# ---- structured output, models.retrieve, fingerprint, errors, the chat fields ----

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object(client):
    import jsonschema
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, response_format=fmt, n=2,
                                       temperature=1.0, seed=5)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=60, temperature=0, response_format={"type": "json_object"},
        stream=True) if c.choices)
    assert isinstance(json.loads(streamed), dict)


def test_guided_choice_and_regex_on_completions(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, n=3, temperature=1.0,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[A-Z][0-9]{3}"}})
    assert re.fullmatch("[A-Z][0-9]{3}", r.choices[0].text) and r.choices[0].finish_reason == "stop"


def test_models_retrieve_and_type_errors_are_bad_requests(client):
    assert client.models.retrieve("tiny:native").id == "tiny:native"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens="ten")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})


def test_min_tokens_and_continuous_usage(client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 6, "stream_options": {
                                                "include_usage": True, "continuous_usage_stats": True}}))
    text_chunks = [c for c in chunks if c.choices]
    assert [c.usage.completion_tokens for c in text_chunks] == list(range(1, len(text_chunks) + 1))
    assert chunks[-1].usage.completion_tokens == 6


def test_continue_final_message_and_template_kwargs(tiny_ref, client):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True,
                                                   "ignore_eos": True})
    ids = tiny_ref.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe answer",
                                    add_special_tokens=False)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == tiny_ref.text(tiny_ref.greedy(ids, 4)[0])
