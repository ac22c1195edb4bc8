"""What the cache-aware routers call on a worker, against a live tiny server: /server_info and
/model_info (and their /get_ names), vllm-router's /render routes and /tokenize bodies, SGLang's
/generate (JSON and SSE), and the SGLang fields the routers add to OpenAI bodies."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.service.live_server import AUTH, read_sse

PROMPT = "Blocks of sixteen tokens"
CHAT = [{"role": "user", "content": "Which block holds token 17?"}]
# Exactly what sglang-router 0.3.2 adds to a chat body (recorded from the router)
SGLANG_CHAT_FIELDS = {"logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
                      "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
                      "return_hidden_states": False}


@pytest.fixture(scope="module")
def http(shared_server):
    with httpx.Client(base_url=shared_server.base_url, timeout=60, headers=AUTH) as c:
        yield c


@pytest.mark.parametrize("path", ["/server_info", "/get_server_info"])
def test_server_info_names_the_model_the_worker_routes(http, path):
    info = http.get(path).json()
    assert (info["served_model_name"], info["dp_size"]) == ("tiny", 1)
    assert "model_path" not in info  # sglang-router would fetch a tokenizer from it
    # the name the router learns is one the worker serves
    r = http.post("/v1/chat/completions", json={"model": info["served_model_name"], "messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    assert http.get(path, headers={"Authorization": ""}).status_code == 401


@pytest.mark.parametrize("path", ["/model_info", "/get_model_info"])
def test_model_info(http, path):
    info = http.get(path).json()
    assert (info["model_path"], info["is_generation"], info["vocab_size"]) == ("tiny", True, 259)


def test_get_load_counts_what_the_engine_holds(http, shared_server):
    (load,) = http.get("/get_load").json()
    running = shared_server.metric("kvserve_num_requests_running")
    waiting = shared_server.metric("kvserve_num_requests_waiting")
    assert (load["dp_rank"], load["num_reqs"], load["num_waiting_reqs"]) == (0, running + waiting, waiting)
    assert load["num_tokens"] == shared_server.metric("kvserve_kv_cache_stored_tokens")


def test_completions_render_is_the_prompt_token_ids(tiny_ref, http):
    r = http.post("/v1/completions/render", json={"prompt": [PROMPT, "xyz"], "max_tokens": 5, "seed": 3})
    assert r.status_code == 200
    rendered = r.json()
    assert [g["token_ids"] for g in rendered] == [tiny_ref.encode(PROMPT), tiny_ref.encode("xyz")]
    assert rendered[0]["sampling_params"]["max_tokens"] == 5 and rendered[0]["model"] == "tiny:native"


def test_chat_render_is_the_templated_token_ids(tiny_ref, http):
    r = http.post("/v1/chat/completions/render", json={"messages": CHAT, "max_tokens": 4, **SGLANG_CHAT_FIELDS})
    assert r.status_code == 200 and r.json()["token_ids"] == tiny_ref.chat_ids(CHAT)


def test_render_refuses_what_generation_refuses(http):
    r = http.post("/v1/completions/render", json={"prompt": PROMPT, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_tokenize_in_the_shapes_vllm_router_sends(tiny_ref, http):
    chat = http.post("/tokenize", json={"continue_final_message": False, "messages": CHAT}).json()
    assert chat["tokens"] == tiny_ref.chat_ids(CHAT)
    text = http.post("/tokenize", json={"model": "tiny", "prompt": PROMPT}).json()
    assert text["tokens"] == tiny_ref.encode(PROMPT)


def test_router_fields_at_defaults_run_and_are_not_logged(tiny_ref, http, shared_server):
    before = shared_server.log.count("ignored unknown fields")
    ref, _ = tiny_ref.greedy(tiny_ref.chat_ids(CHAT), 6)
    body = {"model": "unknown", "messages": CHAT, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/chat/completions", json={**SGLANG_CHAT_FIELDS, **body, "include_reasoning": True})
    assert r.status_code == 200
    # "unknown" is sglang-router's placeholder for no model: the default one answers, under its own id
    assert (r.json()["model"], r.json()["choices"][0]["message"]["content"]) == ("tiny:native", tiny_ref.text(ref))
    cmpl = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "echo": False, "no_stop_trim": False,
                                              "skip_special_tokens": True, "return_hidden_states": False})
    assert cmpl.status_code == 200
    assert shared_server.log.count("ignored unknown fields") == before


@pytest.mark.parametrize("field, value", [("no_stop_trim", True), ("skip_special_tokens", False),
                                          ("return_hidden_states", True)])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_router_fields_kvserve_cannot_honour_are_refused(http, path, field, value):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    r = http.post(path, json={**body, "max_tokens": 2, field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and f"{field}={json.dumps(value)}" in err["message"]


def test_reasoning_fields_take_any_value(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "separate_reasoning": False,
                                                "stream_reasoning": False, "include_reasoning": False})
    assert r.status_code == 200


def test_sglang_generate_greedy(tiny_ref, http):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 8)
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
            "model": None, "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
            "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
            "return_entropy": False}  # as sglang-router forwards it
    r = http.post("/generate", json=body)
    assert r.status_code == 200
    out = r.json()
    assert (out["text"], out["output_ids"]) == (tiny_ref.text(ref), ref)
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(ids), 8)
    by_ids = http.post("/generate", json={**body, "text": None, "input_ids": ids}).json()
    assert by_ids["output_ids"] == ref


def test_sglang_generate_stream_holds_the_text_so_far(tiny_ref, http):
    ids = tiny_ref.encode(PROMPT)
    ref, _ = tiny_ref.greedy(ids, 5)
    r = http.post("/generate", json={"text": PROMPT, "stream": True,
                                     "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}})
    events = read_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["output_ids"] for c in chunks] == [ref[:i + 1] for i in range(5)]
    assert chunks[-1]["text"] == tiny_ref.text(ref) and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("sampling, named", [
    ({"max_new_tokens": 0}, "sampling_params.max_new_tokens"),
    ({"n": 2}, "sampling_params.n"),
    ({"no_stop_trim": True}, "sampling_params.no_stop_trim"),
    ({"temperature": -1}, "sampling_params.temperature"),
    ({"regex": "a+", "ebnf": "root ::= \"a\""}, "give at most one of json_schema, regex, ebnf"),
])
def test_sglang_generate_bad_sampling_params(http, sampling, named):
    r = http.post("/generate", json={"text": PROMPT, "sampling_params": sampling})
    assert r.status_code == 400 and named in r.json()["error"]


def test_sglang_generate_refusals(http):
    assert "return_logprob" in http.post("/generate", json={"text": PROMPT, "return_logprob": True}).json()["error"]
    both = http.post("/generate", json={"text": PROMPT, "input_ids": [1, 2]})
    assert both.status_code == 400 and "exactly one of text or input_ids" in both.json()["error"]
    batch = http.post("/generate", json={"text": [PROMPT, PROMPT]})
    assert batch.status_code == 400 and "batch" in batch.json()["error"]


def test_tgi_generate_still_tgi(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and set(r.json()) == {"generated_text"}
