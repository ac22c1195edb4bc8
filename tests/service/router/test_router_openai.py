"""The openai client through a real sglang-router and vllm-router (cache_aware) in front of two live
tiny workers: completions and chat, streaming and not, answered exactly as the tiny model's greedy
reference; SGLang's /generate and a request without `model` through the router; and nothing the
routers add logged as an unknown field by a worker."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.service.router.router_process import RouterProcess

ROUTER_DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "router.json"

PROMPT = "Routers send each prefix to one worker"
CHAT = [{"role": "user", "content": "Which worker holds my prefix?"}]
GREEDY = {"temperature": 0, "max_tokens": 6}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module", params=["sglang", "vllm"])
def router(request, workers):
    with RouterProcess(request.param, [w.base_url for w in workers], "cache_aware") as r:
        yield r


@pytest.fixture(scope="module")
def client(router):
    return openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions(tiny_ref, client):
    ref, _ = tiny_ref.greedy(tiny_ref.encode(PROMPT), 6)
    whole = client.completions.create(model="tiny", prompt=PROMPT, extra_body=NO_EOS, **GREEDY)
    assert whole.choices[0].text == tiny_ref.text(ref) and whole.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, stream=True, extra_body=NO_EOS, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tiny_ref.text(ref)


def test_chat(tiny_ref, client):
    ref, _ = tiny_ref.greedy(tiny_ref.chat_ids(CHAT), 6)
    whole = client.chat.completions.create(model="tiny", messages=CHAT, extra_body=NO_EOS, **GREEDY)
    assert whole.choices[0].message.content == tiny_ref.text(ref) and whole.model == "tiny"
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, stream=True, extra_body=NO_EOS, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tiny_ref.text(ref)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_model_is_the_served_model(tiny_ref, router):
    r = httpx.post(router.base_url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny:native"


def test_sglang_generate_through_the_router(tiny_ref, router):
    ref, _ = tiny_ref.greedy(tiny_ref.encode(PROMPT), 5)
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}
    r = httpx.post(router.base_url + "/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["output_ids"] == ref


def test_vllm_router_routes_on_the_rendered_token_ids(router, client):
    if router.kind != "vllm":
        pytest.skip("only vllm-router asks workers to render prompts")
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1)
    inputs = {line.split("result=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
              for line in router.metrics().splitlines() if line.startswith("vllm_router_kv_routing_inputs_total")}
    assert inputs.get("render", 0) >= 1 and "render_unavailable" not in inputs


def test_workers_log_no_unknown_fields(workers, router, client):
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    for w in workers:
        assert "ignored unknown fields" not in w.log


def test_the_router_dashboard_names_metrics_the_router_exports(router, client):
    if router.kind != "sglang":
        pytest.skip("deploy/grafana/router.json is sglang-router's dashboard")
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1)
    exported = set(re.findall(r"^(smg_[a-z_]+)", router.metrics(), re.MULTILINE))
    board = json.loads(ROUTER_DASHBOARD.read_text())
    used = {n for p in board["panels"] for t in p["targets"] for n in re.findall(r"\bsmg_[a-z_]+", t["expr"])}
    assert used and used <= exported, sorted(used - exported)
