"""Context-length errors in OpenAI's exact shape and wording, recognised by the client libraries that
classify them: litellm's ContextWindowExceededError and LangChain's ContextOverflowError fire against
the shared live tiny server (max_model_len 160), for a prompt too long and for max_tokens too large."""
from __future__ import annotations

import os

import httpx
import openai
import pytest

from tests.service.live_server import API_KEY, AUTH, SHARED_MAX_MODEL_LEN

LONG = "x" * (2 * SHARED_MAX_MODEL_LEN)   # the tiny model's byte tokenizer: one token per character
FIRST = f"This model's maximum context length is {SHARED_MAX_MODEL_LEN} tokens."


def check_error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"].startswith(FIRST), err["message"]
    return err["message"]


def test_prompt_and_max_tokens_too_long_use_openais_wording(shared_server, tiny_ref):
    hi = len(tiny_ref.encode("hi"))
    with httpx.Client(base_url=shared_server.base_url, headers=AUTH, timeout=60) as http:
        message = check_error(http.post("/v1/completions", json={"prompt": LONG, "max_tokens": 1}), "prompt")
        assert f"the prompt has {len(tiny_ref.encode(LONG))} tokens" in message
        message = check_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 500}), "max_tokens")
        assert f"you requested {hi + 500} tokens ({hi} in the prompt, 500 in the completion)" in message
        assert f"it must be in [1, {SHARED_MAX_MODEL_LEN - hi}]" in message
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 500}
        check_error(http.post("/v1/chat/completions", json=chat), "max_completion_tokens")
        check_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": LONG}]}), "messages")


def test_openai_client_sees_the_code(shared_server):
    client = openai.OpenAI(base_url=shared_server.url("/v1"), api_key=API_KEY)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=LONG, max_tokens=1)
    assert info.value.code == "context_length_exceeded" and info.value.body["message"].startswith(FIRST)


def test_litellm_raises_context_window_exceeded(shared_server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches its price list otherwise
    litellm = pytest.importorskip("litellm")
    messages = [{"role": "user", "content": LONG}]
    for provider in ("openai", "hosted_vllm"):
        with pytest.raises(litellm.ContextWindowExceededError):
            litellm.completion(model=f"{provider}/tiny", api_base=shared_server.url("/v1"), api_key=API_KEY,
                               messages=messages, max_tokens=4)
    # the same call within the context is answered: the classification is not a blanket one
    ok = litellm.completion(model="openai/tiny", api_base=shared_server.url("/v1"), api_key=API_KEY,
                            messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_langchain_raises_context_overflow(shared_server):
    chat_models = pytest.importorskip("langchain_openai")
    from langchain_core.exceptions import ContextOverflowError

    llm = chat_models.ChatOpenAI(base_url=shared_server.url("/v1"), api_key=API_KEY, model="tiny", max_tokens=4)
    with pytest.raises(ContextOverflowError):
        llm.invoke(LONG)
    assert isinstance(llm.invoke("hi").content, str)
