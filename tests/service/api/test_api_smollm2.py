"""The real SmolLM2-135M behind the real HTTP server, end to end: a greedy chat equals transformers'
greedy generation and ends on the model's own EOS; a stream equals the JSON answer on text whose
characters span several tokens; a stop string that spans BPE tokens cuts exactly there."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.service.live_server import LiveServer, read_sse

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def http(smollm2_gguf_path):
    with LiveServer("--model", str(smollm2_gguf_path), "--kv-cache-memory", "64MiB", "--max-model-len", "1024") as server, \
            httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def test_greedy_chat_equals_transformers_and_stops_on_eos(http, hf_smollm2):
    hf_model, hf_tok = hf_smollm2
    prompt = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=2,
                                pad_token_id=2)[0, len(prompt):].tolist()
    assert out[-1] == 2, "transformers' answer did not end on <|im_end|> within 64 tokens"
    assert http.post("/tokenize", json={"messages": QUESTION}).json()["tokens"] == prompt
    r = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 64, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == hf_tok.decode(out[:-1], skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] == len(out) and body["usage"]["prompt_tokens"] == len(prompt)


def test_stream_equals_json_on_text_whose_characters_span_tokens(http):
    body = {"prompt": "Voici la liste des fruits en français : pêche, fraise, citron, châtaigne,", "max_tokens": 40,
            "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = read_sse(r.read().decode())
    assert events[-1] == "[DONE]"
    pieces = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(pieces) == whole
    assert any(ord(ch) > 127 for ch in whole), f"no non-ASCII text to check: {whole!r}"
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_a_stop_string_spanning_tokens_cuts_exactly_there(http):
    body = {"inputs": "The three primary colors are", "parameters": {"max_new_tokens": 24, "ignore_eos": True,
                                                                      "details": True}}
    full = http.post("/generate", json=body).json()
    text, tokens = full["generated_text"], full["details"]["tokens"]
    # a stop string from the last 2 characters of one token to the first 2 of the next
    offsets, at = [], 0
    for t in tokens:
        at += len(t["text"])
        offsets.append(at)
    boundary = next(o for o, t in zip(offsets[2:], tokens[3:]) if len(t["text"]) >= 3 and text[o - 2:o].strip())
    stop = text[boundary - 2:boundary + 2]
    assert len(stop) == 4
    cut = http.post("/generate", json={**body, "parameters": {**body["parameters"], "stop": [stop]}}).json()
    assert cut["generated_text"] == text[:text.index(stop)]
    assert cut["details"]["finish_reason"] == "stop_sequence"  # TGI names a stop string's finish so
