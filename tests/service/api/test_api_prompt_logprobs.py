"""Prompt logprobs over HTTP against the shared live tiny server, each value checked against the
no-cache forward's log-softmax: OpenAI's legacy `echo` + `logprobs` (first token null; with
`max_tokens: 0` the prompt alone; streamed too), vLLM's `prompt_logprobs`, and TGI's
`decoder_input_details` through huggingface_hub's text_generation."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.service.live_server import API_KEY, AUTH, read_sse

PROMPT = "Blocks of sixteen tokens"


@pytest.fixture(scope="module")
def http(shared_server):
    with httpx.Client(base_url=shared_server.base_url, headers=AUTH, timeout=60) as c:
        yield c


@torch.inference_mode()
def log_softmax(tiny_ref, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(tiny_ref.model(torch.tensor([ids]))[0].float(), dim=-1)


def test_echo_with_logprobs_returns_the_prompts_logprobs(http, tiny_ref):
    ids = tiny_ref.encode(PROMPT)
    lp = log_softmax(tiny_ref, ids)
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True, "ignore_eos": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    gen, _ = tiny_ref.greedy(ids, 2)
    assert choice["text"] == PROMPT + tiny_ref.text(gen)
    got = choice["logprobs"]
    assert len(got["tokens"]) == len(ids) + 2 and got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert got["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(ids)):  # top-1 of each position is the reference's likeliest
        assert list(got["top_logprobs"][i].values()) == pytest.approx([lp[i - 1].max().item()], abs=1e-4)
    assert got["text_offset"] == sorted(got["text_offset"]) and got["text_offset"][0] == 0
    # the generated part equals what the same request without echo answers
    plain = http.post("/v1/completions", json=body | {"echo": False}).json()["choices"][0]["logprobs"]
    assert got["token_logprobs"][len(ids):] == plain["token_logprobs"]


def test_max_tokens_zero_with_echo_is_the_prompt_alone(http, tiny_ref):
    ids = tiny_ref.encode(PROMPT)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "logprobs": 0, "echo": True})
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and len(choice["logprobs"]["tokens"]) == len(ids)
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == len(ids)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_echo_streams_the_prompt_first(http, tiny_ref):
    ids = tiny_ref.encode(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 0, "echo": True, "stream": True}
    events = [json.loads(e) for e in read_sse(http.post("/v1/completions", json=body).text) if e != "[DONE]"]
    choices = [e["choices"][0] for e in events]
    whole = http.post("/v1/completions", json=body | {"stream": False}).json()["choices"][0]
    assert "".join(c["text"] for c in choices) == whole["text"] and choices[0]["text"].startswith(PROMPT)
    assert [v for c in choices for v in c["logprobs"]["token_logprobs"]] == whole["logprobs"]["token_logprobs"]
    assert [v for c in choices for v in c["logprobs"]["text_offset"]] == whole["logprobs"]["text_offset"]
    assert len(whole["logprobs"]["tokens"]) == len(ids) + 3


def test_vllm_prompt_logprobs(http, tiny_ref):
    ids = tiny_ref.encode(PROMPT)
    lp = log_softmax(tiny_ref, ids)
    choice = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "prompt_logprobs": 3}).json()["choices"][0]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for i in range(1, len(ids)):
        mine = entries[i][str(ids[i])]
        assert mine["logprob"] == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        assert mine["rank"] == int((lp[i - 1] > lp[i - 1, ids[i]]).sum()) + 1
        by_rank = {v["rank"]: v["logprob"] for v in entries[i].values()}
        assert [by_rank[r] for r in (1, 2, 3)] == pytest.approx(lp[i - 1].topk(3).values.tolist(), abs=1e-4)
    plain = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}).json()["choices"][0]
    assert "prompt_logprobs" not in plain


def test_tgi_decoder_input_details(shared_server, tiny_ref):
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(base_url=shared_server.base_url, api_key=API_KEY, timeout=60)
    out = client.text_generation(PROMPT, max_new_tokens=2, details=True, decoder_input_details=True)
    ids = tiny_ref.encode(PROMPT)
    lp = log_softmax(tiny_ref, ids)
    prefill = out.details.prefill
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx([lp[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                             abs=1e-4)
    assert "".join(t.text for t in prefill) == PROMPT
