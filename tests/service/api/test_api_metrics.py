"""/metrics of a live `--variants mha,gqa-2,mqa` tiny server: the KV footprint of each variant equals
the formula, per-variant counters move with traffic, and a client that disconnects (mid-stream or
while waiting for JSON) has its request aborted and its blocks freed at once."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from model.config import PRESETS
from tests.service.live_server import LiveServer, only_match, open_raw_request, wait_until

VARIANTS = {"mha": 4, "gqa-2": 2, "mqa": 1}  # tiny: 4 query heads -> K/V heads per variant
BUDGET = 1 << 20
BLOCK = 8
DTYPE_BYTES = 4  # float32


@pytest.fixture(scope="module")
def server():
    with LiveServer("--variants", ",".join(VARIANTS), "--kv-cache-memory", "1MiB", "--block-size", str(BLOCK)) as s:
        yield s


def test_without_api_key_nothing_asks_for_one(server):
    assert httpx.get(server.url("/v1/models")).status_code == 200
    assert httpx.post(server.url("/tokenize"), json={"prompt": "a"}).status_code == 200


def test_footprint_of_each_variant_equals_the_formula(server):
    cfg = PRESETS["tiny"]
    m = server.metrics()
    for variant, n_kv in VARIANTS.items():
        v = (("model_name", "tiny"), ("variant", variant))
        bytes_per_token = 2 * cfg.n_layers * n_kv * cfg.head_dim * DTYPE_BYTES
        bytes_per_block = bytes_per_token * BLOCK
        data_blocks = BUDGET // bytes_per_block         # the null block comes on top of the budget
        assert m[("kvserve_kv_cache_bytes_per_token", v)] == bytes_per_token
        assert m[("kvserve_kv_cache_bytes_per_block", v)] == bytes_per_block
        assert m[("kvserve_kv_cache_block_size_tokens", v)] == BLOCK
        assert m[("kvserve_kv_cache_num_blocks", v)] == data_blocks
        assert m[("kvserve_kv_cache_capacity_tokens", v)] == data_blocks * BLOCK
        assert m[("kvserve_kv_cache_memory_bytes", v)] == (data_blocks + 1) * bytes_per_block
        assert m[("kvserve_engine_alive", v)] == 1
        infos = [dict(labels) for name, labels in m if name == "kvserve_model_info"
                 and dict(labels)["variant"] == variant]
        assert len(infos) == 1 and m[("kvserve_model_info", tuple(sorted(infos[0].items())))] == 1
        labels = infos[0]
        assert labels == {"model_name": "tiny", "variant": variant, "model": "tiny", "n_heads": str(cfg.n_heads), "n_kv_heads": str(n_kv),
                          "head_dim": str(cfg.head_dim), "n_layers": str(cfg.n_layers), "dtype": "float32",
                          "attention": "kernel", "block_size": str(BLOCK),  # what --attention auto served
                          "weights": "f32; lm head f32"}  # a float32 checkpoint: the fixed-order dense kernel
    # the same byte budget holds exactly n_heads = 4x the tokens with MQA as with MHA
    assert only_match(m, "kvserve_kv_cache_capacity_tokens", variant="mqa") == \
        4 * only_match(m, "kvserve_kv_cache_capacity_tokens", variant="mha")


def test_start_up_logs_one_footprint_line_per_variant(server):
    for variant in VARIANTS:
        lines = [line for line in server.lines if f"variant {variant}:" in line]
        assert len(lines) == 1 and "B/token" in lines[0] and "tokens capacity" in lines[0]


def test_models_route_to_their_variant(tiny_ref, server):
    with openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == [f"tiny:{v}" for v in VARIANTS]
        ids = tiny_ref.encode("route me")
        for variant in ("mqa", "mha"):
            r = client.completions.create(model=f"tiny:{variant}", prompt="route me", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == tiny_ref.text(tiny_ref.greedy(ids, 5, variant=variant)[0])


def test_counters_move_for_the_variant_that_served(tiny_ref, server):
    before = server.metrics()

    def delta(name, **labels):
        return server.metric(name, **labels) - only_match(before, name, **labels)

    r = httpx.post(server.url("/v1/completions"), json={"model": "tiny:gqa-2", "prompt": "count me", "max_tokens": 7,
                                                        "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    prompt_tokens = len(tiny_ref.encode("count me"))
    assert delta("kvserve_requests_finished_total", variant="gqa-2", finish_reason="length") == 1
    assert delta("kvserve_generation_tokens_total", variant="gqa-2") == 7
    assert delta("kvserve_prompt_tokens_total", variant="gqa-2") == prompt_tokens
    assert delta("kvserve_time_to_first_token_seconds_count", variant="gqa-2") == 1
    assert delta("kvserve_inter_token_latency_seconds_count", variant="gqa-2") == 6
    assert delta("kvserve_e2e_request_latency_seconds_count", variant="gqa-2") == 1
    assert delta("kvserve_request_generation_tokens_sum", variant="gqa-2") == 7
    assert delta("kvserve_prefix_cache_queries_total", variant="gqa-2") >= prompt_tokens
    for other in ("mha", "mqa"):
        assert delta("kvserve_generation_tokens_total", variant=other) == 0


def test_blocks_are_back_to_zero_when_idle(server):
    for variant in VARIANTS:
        server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant=variant, state="used")
        assert server.metric("kvserve_num_requests_running", variant=variant) == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    variant = "mqa"
    aborts = server.metric("kvserve_requests_finished_total", variant=variant, finish_reason="abort")
    body = {"model": f"tiny:{variant}", "prompt": "stream then vanish", "max_tokens": 450, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url("/v1/completions"), json=body) as r:
        lines = r.iter_lines()  # kept: dropping a half-read iterator would close the connection already
        first = next(lines)
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["finish_reason"] is None
        # the gauges are a snapshot the engine takes after each step
        wait_until(lambda: server.metric("kvserve_kv_cache_blocks", variant=variant, state="used") > 0,
                   "the streaming request never held a block")
    # leaving the `with` closed the connection with 440+ tokens still to go
    server.wait_for_metric("kvserve_requests_finished_total", aborts + 1, variant=variant, finish_reason="abort")
    server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant=variant, state="used")
    assert server.metric("kvserve_num_requests_running", variant=variant) == 0


def test_disconnect_while_waiting_for_json_aborts_and_frees_blocks(server):
    variant = "mha"
    aborts = server.metric("kvserve_requests_finished_total", variant=variant, finish_reason="abort")
    sock = open_raw_request(server.base_url, "/v1/completions", {
        "model": f"tiny:{variant}", "prompt": "wait then vanish", "max_tokens": 450, "ignore_eos": True})
    server.wait_for_metric("kvserve_num_requests_running", 1, variant=variant)
    sock.close()
    server.wait_for_metric("kvserve_requests_finished_total", aborts + 1, variant=variant, finish_reason="abort")
    server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant=variant, state="used")
