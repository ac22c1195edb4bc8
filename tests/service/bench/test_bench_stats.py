"""The load generator without a server: statistics on synthetic timings, datasets, arrivals, the
SSE client over a mock transport, argument errors, and the variant report's arithmetic."""
from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import numpy as np
import pytest
import torch

from service.bench import cli, datasets
from service.bench.client import RequestRecord, Target, send_request
from service.bench.serve import LoadConfig, arrival_offsets, run_load
from service.bench.stats import SLO, distribution, parse_goodput, parse_percentiles, percentile, summarize
from service.bench.variants import footprint, held_text, perplexity, text_ids


def record(index, start, chunks, end, tokens, status=200, error="", prompt_len=10):
    return RequestRecord(index=index, prompt_len=prompt_len, max_tokens=tokens, start=start, end=end,
                         chunk_times=list(chunks), output_tokens=tokens, status=status, error=error)


# --- statistics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.exponential(size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)


def test_percentile_errors():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="out of range"):
        percentile([1.0], 101)


def test_distribution_in_ms_matches_numpy():
    secs = [0.010, 0.020, 0.035, 0.5, 0.0125]
    d = distribution(secs, (50, 90, 99))
    ms = np.array(secs) * 1000
    assert d.count == 5
    assert d.mean == pytest.approx(ms.mean())
    assert d.std == pytest.approx(ms.std())          # population std (ddof=0)
    assert d.median == pytest.approx(np.median(ms))
    assert (d.min, d.max) == pytest.approx((ms.min(), ms.max()))
    assert d.percentiles == pytest.approx({f"p{q}": np.percentile(ms, q) for q in (50, 90, 99)})
    assert distribution([]) is None


def test_per_request_metrics_by_hand():
    # sent at 10.0; text chunks at 10.2, 10.25, 10.4; done at 10.5; 4 tokens (usage) in 3 chunks
    r = record(0, 10.0, [10.2, 10.25, 10.4], 10.5, 4)
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.05, 0.15])
    assert r.tpot == pytest.approx((0.5 - 0.2) / 3)


def test_tpot_with_one_output_token_is_undefined_and_excluded():
    one = record(0, 0.0, [0.3], 0.31, 1)
    two = record(1, 0.0, [0.1, 0.3], 0.3, 2)
    assert one.tpot is None
    s = summarize([one, two], 1.0, slo=SLO(tpot=50.0))
    assert s.tpot_ms.count == 1 and s.tpot_ms.mean == pytest.approx(200.0)
    # `one` has no TPOT so it meets the TPOT SLO; `two` (200 ms) does not
    assert s.goodput == pytest.approx(1.0)


def test_summary_by_hand():
    recs = [
        record(0, 0.0, [0.1, 0.2, 0.3], 0.3, 3, prompt_len=10),    # ttft 100, tpot 100, e2e 300
        record(1, 0.5, [1.0, 1.1], 1.5, 2, prompt_len=20),         # ttft 500, tpot 500, e2e 1000
        record(2, 1.0, [1.05, 1.06, 1.07, 1.08], 1.1, 5, prompt_len=30),  # ttft 50, tpot 12.5, e2e 100
        record(3, 1.0, [], 1.2, 0, status=503, error="queue full"),
        record(4, 1.0, [], 1.3, 0, status=503, error="queue full"),
        record(5, 1.0, [], 1.1, 0, status=0, error="ConnectError"),
        record(6, 1.0, [1.1], 1.2, 1, status=200, error="engine died"),
    ]
    s = summarize(recs, duration_s=2.0, slo=parse_goodput(["ttft:200", "e2el:500"]))
    assert (s.num_requests, s.completed, s.failed) == (7, 3, 4)
    assert s.failures == {"200 (error in stream)": 1, "503": 2, "connection error": 1}
    assert s.total_input_tokens == 60 and s.total_output_tokens == 10
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(5.0)
    assert s.total_token_throughput == pytest.approx(35.0)
    assert s.goodput == pytest.approx(1.0)          # requests 0 and 2 meet both SLOs
    assert s.slo == {"ttft": 200.0, "e2el": 500.0}
    assert s.ttft_ms.mean == pytest.approx((100 + 500 + 50) / 3)
    assert s.ttft_ms.median == pytest.approx(100)
    assert s.tpot_ms.mean == pytest.approx((100 + 500 + 12.5) / 3)
    assert s.e2el_ms.percentiles["p90"] == pytest.approx(np.percentile([300, 1000, 100], 90))
    itl = [100, 100, 100, 10, 10, 10]
    assert s.itl_ms.count == 6 and s.itl_ms.mean == pytest.approx(np.mean(itl))
    e2e_all = [0.3, 1.0, 0.1, 0.2, 0.3, 0.1, 0.2]
    assert s.mean_concurrency == pytest.approx(sum(e2e_all) / 2.0)
    assert summarize(recs, 2.0).goodput is None


def test_summary_with_no_success_has_no_distributions():
    s = summarize([record(0, 0.0, [], 0.1, 0, status=401, error="bad key")], 1.0)
    assert s.completed == 0 and s.ttft_ms is None and s.failures == {"401": 1}


@pytest.mark.parametrize("items, message", [
    (["ttft"], "METRIC:MS"), (["foo:5"], "METRIC:MS"), (["ttft:-1"], "> 0"), (["tpot:abc"], "> 0"),
    (["e2el:inf"], "> 0"),
])
def test_goodput_errors(items, message):
    with pytest.raises(ValueError, match=message):
        parse_goodput(items)


def test_percentile_option():
    assert parse_percentiles("50,90,99.9") == (50.0, 90.0, 99.9)
    for bad in ("0", "101", "a,b"):
        with pytest.raises(ValueError, match="--percentiles"):
            parse_percentiles(bad)


# --- datasets ------------------------------------------------------------------------------------

def test_random_lengths_and_spread():
    exact = datasets.random_requests(20, 40, 7, 0.0, seed=1)
    assert all(len(r.prompt.split()) == 40 and r.prompt_len == 40 and r.max_tokens == 7 for r in exact)
    spread = datasets.random_requests(300, 100, 50, 0.5, seed=2)
    ins = [len(r.prompt.split()) for r in spread]
    outs = [r.max_tokens for r in spread]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 30
    assert min(outs) >= 25 and max(outs) <= 75
    assert datasets.random_requests(5, 10, 5, 0.2, seed=3) == datasets.random_requests(5, 10, 5, 0.2, seed=3)
    assert datasets.random_requests(5, 10, 5, 0.2, seed=3) != datasets.random_requests(5, 10, 5, 0.2, seed=4)


def test_tokens_per_word_scales_word_count():
    reqs = datasets.random_requests(3, 50, 5, 0.0, seed=0, tokens_per_word=5.0)
    assert all(len(r.prompt.split()) == 10 and r.prompt_len == 50 for r in reqs)


def test_random_errors():
    with pytest.raises(ValueError, match=r"--random-range-ratio=1.0 .*\[0, 1\)"):
        datasets.random_requests(3, 10, 10, 1.0, seed=0)
    with pytest.raises(ValueError, match="--random-input-len=0"):
        datasets.random_requests(3, 0, 10, 0.0, seed=0)


def test_natural_prompts_cycle_and_vary():
    assert len(set(datasets.NATURAL_PROMPTS)) == len(datasets.NATURAL_PROMPTS) >= 50
    reqs = datasets.natural_requests(2 * len(datasets.NATURAL_PROMPTS), 64, seed=5)
    n = len(datasets.NATURAL_PROMPTS)
    assert sorted(r.prompt for r in reqs[:n]) == sorted(datasets.NATURAL_PROMPTS)
    assert [r.prompt for r in reqs[n:]] == [r.prompt for r in reqs[:n]]
    assert all(r.max_tokens == 64 for r in reqs)


def test_shared_prefix_is_really_shared():
    reqs = datasets.shared_prefix_requests(12, 300, 20, 16, seed=9)
    system = reqs[0].system
    assert all(r.system == system for r in reqs)
    assert abs(len(system.split()) - 300) <= 10
    assert len({r.prompt for r in reqs}) == 12
    prompts = [r.completion_prompt() for r in reqs]
    assert all(p.startswith(system + "\n\n") for p in prompts)
    assert all(abs(len(r.prompt.split()) - 22) <= 1 for r in reqs)


def test_jsonl_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there"}\n\n{"prompt": "count to ten", "max_tokens": 5}\n')
    reqs = datasets.jsonl_requests(path, 5, 32)
    assert [(r.prompt, r.max_tokens) for r in reqs] == [("hello there", 32), ("count to ten", 5)] * 2 + [("hello there", 32)]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}\n{not json}\n', r"p.jsonl:2: invalid JSON"),
    ('["a"]\n', r"p.jsonl:1: each line must be a JSON object"),
    ('{"text": "a"}\n', r"p.jsonl:1: \"prompt\" must be a non-empty string"),
    ('{"prompt": "  "}\n', r"p.jsonl:1: \"prompt\" must be a non-empty string"),
    ('{"prompt": "a", "max_tokens": 0}\n', r"p.jsonl:1: \"max_tokens\"=0 must be an integer >= 1"),
    ('{"prompt": "a", "max_tokens": true}\n', r"\"max_tokens\"=True"),
    ('\n\n', r"has no prompts"),
])
def test_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        datasets.jsonl_requests(path, 3, 8)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read dataset"):
        datasets.jsonl_requests(tmp_path / "nope.jsonl", 3, 8)


# --- arrivals ------------------------------------------------------------------------------------

def test_poisson_arrivals_seeded_with_mean_rate():
    a = arrival_offsets(20001, 4.0, 1.0, random.Random(7))
    assert a == arrival_offsets(20001, 4.0, 1.0, random.Random(7))
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)     # exponential: CV 1


def test_burstiness_changes_spread_not_mean():
    gaps = np.diff(arrival_offsets(20001, 2.0, 4.0, random.Random(1)))
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(0.5, rel=0.05)     # gamma shape k: CV 1/sqrt(k)


def test_arrival_errors_and_infinite_rate():
    assert arrival_offsets(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="--request-rate=0"):
        arrival_offsets(3, 0.0, 1.0, random.Random(0))
    with pytest.raises(ValueError, match="--burstiness=0"):
        arrival_offsets(3, 1.0, 0.0, random.Random(0))


# --- the client over a mock transport ------------------------------------------------------------

def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def run_one(handler, target=None, req=None):
    target = target or Target("http://test", "/v1/completions", "m")
    req = req or datasets.SampleRequest("hi", 1, 4)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await send_request(http, target, req, 0)
    return asyncio.run(go())


def test_client_parses_completion_stream_with_usage():
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content), auth=request.headers.get("authorization"), url=str(request.url))
        body = sse({"choices": [{"text": "Hel"}]}, {"choices": [{"text": ""}]}, {"choices": [{"text": "lo"}]},
                   {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}, "[DONE]")
        return httpx.Response(200, content=body)

    rec = run_one(handler, Target("http://test", "/v1/completions", "m", api_key="k", ignore_eos=True))
    assert rec.success and rec.text == "Hello"
    assert len(rec.chunk_times) == 2 and rec.output_tokens == 3 and rec.prompt_len == 7 and rec.usage_reported
    assert seen["url"] == "http://test/v1/completions" and seen["auth"] == "Bearer k"
    assert seen["prompt"] == "hi" and seen["stream"] is True and seen["ignore_eos"] is True
    assert seen["stream_options"] == {"include_usage": True} and seen["max_tokens"] == 4


def test_client_chat_without_usage_counts_chunks():
    seen = {}

    def handler(request):
        seen.update(json.loads(request.content))
        body = sse({"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "a"}}]},
                   {"choices": [{"delta": {"content": "b"}}]}, {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                   "[DONE]")
        return httpx.Response(200, content=body)

    req = datasets.SampleRequest("q", 1, 4, system="sys")
    rec = run_one(handler, Target("http://test", "/v1/chat/completions", "m"), req)
    assert rec.success and rec.text == "ab" and rec.output_tokens == 2 and not rec.usage_reported
    assert seen["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    assert "ignore_eos" not in seen and "prompt" not in seen


def test_client_records_http_and_stream_errors():
    rec = run_one(lambda r: httpx.Response(503, json={"error": {"message": "queue full", "type": "x"}}))
    assert not rec.success and rec.status == 503 and rec.error == "queue full"
    rec = run_one(lambda r: httpx.Response(200, content=sse({"choices": [{"text": "x"}]}, {"error": {"message": "boom"}})))
    assert not rec.success and rec.error == "boom" and rec.text == "x"

    def refuse(request):
        raise httpx.ConnectError("connection refused")
    rec = run_one(refuse)
    assert rec.status == 0 and "ConnectError" in rec.error and not rec.success


def test_closed_loop_never_exceeds_concurrency():
    state = {"now": 0, "max": 0}
    ready = asyncio.Event()

    async def handler(request):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        if state["now"] >= 3:
            ready.set()
        await asyncio.wait_for(ready.wait(), 10)   # the first 3 hold until 3 are in flight together
        state["now"] -= 1
        return httpx.Response(200, content=sse({"choices": [{"text": "t"}]}, "[DONE]"))

    reqs = datasets.random_requests(10, 5, 1, 0.0, seed=0)
    load = LoadConfig(max_concurrency=3, num_warmups=3, progress=False)
    run = asyncio.run(run_load(Target("http://test", "/v1/completions", "m"), reqs, load, httpx.MockTransport(handler)))
    assert state["max"] == 3
    assert [r.index for r in run.records] == list(range(10)) and all(r.success for r in run.records)


# --- command-line errors -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["serve", "--max-concurrency", "0"], "--max-concurrency=0"),
    (["serve", "--request-rate", "-1"], "--request-rate=-1.0"),
    (["serve", "--burstiness", "0"], "--burstiness=0.0"),
    (["serve", "--random-range-ratio", "2"], "--random-range-ratio=2.0"),
    (["serve", "--num-prompts", "0"], "--num-prompts=0"),
    (["serve", "--goodput", "latency:5"], "--goodput 'latency:5'"),
    (["serve", "--dataset", "jsonl"], "--dataset-path"),
    (["serve", "--port", "70000"], "--port=70000"),
    (["serve", "--base-url", "localhost:8000"], "http://"),
    (["serve", "--endpoint", "/v1/embeddings"], "invalid choice: '/v1/embeddings'"),
    (["serve", "--num-prompts", "x"], "invalid int value: 'x'"),
    (["variants", "--concurrency", "1,a"], "--concurrency '1,a'"),
    (["variants", "--ppl-tokens", "0"], "--ppl-tokens=0"),
    (["variants", "--kv-budget", "lots"], "invalid size 'lots'"),
])
def test_bad_values_give_one_line_and_exit_2(argv, needle, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:   # argparse's own type and choice errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1, err


def test_unreachable_server_is_one_line_and_exit_1(capsys):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound but not listening: connection refused
        rc = cli.main(["serve", "--port", str(port), "--num-prompts", "2", "--disable-tqdm"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot list models" in err and err.count("\n") == 1


# --- the variant report's arithmetic and perplexity -----------------------------------------------

def test_footprint_of_smollm2_by_hand():
    from model.config import PRESETS
    cfg = PRESETS["smollm2-135m"]
    gib = 2**30
    # bytes/token = 2 * 30 layers * n_kv * 64 * 2 bytes; whole blocks of 16 tokens; 2048 = 128 blocks
    expected = {"gqa-3": (3, 23040, 2912 * 16, 22), "mha": (9, 69120, 970 * 16, 7), "mqa": (1, 7680, 8738 * 16, 68)}
    for variant, (n_kv, bpt, cap, seqs) in expected.items():
        row = footprint(cfg, variant, 2, gib, 16, 2048)
        assert (row.n_kv_heads, row.bytes_per_token, row.capacity_tokens, row.concurrent_seqs) == (n_kv, bpt, cap, seqs)
    with pytest.raises(ValueError, match="valid N: 1, 3, 9"):
        footprint(cfg, "gqa-2", 2, gib, 16, 2048)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny[0]


def reference_nll(model, ids, window, stride):
    """Each target ids[t] scored alone, with the context of the first window that reaches it."""
    nlls = []
    for t in range(1, len(ids)):
        begin = 0
        while begin + window <= t:
            begin += stride
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:t + 1]]))[0, -2].double()
        nlls.append(-(logits.log_softmax(-1)[ids[t]]).item())
    return nlls


@pytest.mark.parametrize("n, window, stride", [(20, 32, 16), (50, 16, 8), (41, 12, 5), (30, 10, 9)])
def test_perplexity_sliding_windows_against_per_token_reference(tiny_model, n, window, stride):
    ids = torch.randint(0, 259, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    expected = math.exp(np.mean(reference_nll(tiny_model, ids, window, stride)))
    assert perplexity(tiny_model, ids, window, stride) == pytest.approx(expected, rel=1e-5)


def test_perplexity_errors(tiny_model):
    with pytest.raises(ValueError, match="stride=8"):
        perplexity(tiny_model, [1, 2, 3], 8, 8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_model, [1], 8, 4)


def test_text_ids_are_the_start_of_the_held_text():
    class Bytes:
        def encode(self, text, add_special_tokens=True):
            return list(text.encode())
    ids = text_ids(Bytes(), 5000)
    assert ids == list(held_text().encode()[:5000])
