"""Scaling out behind sglang-router: cache_aware against round_robin over two replicas, and one
replica against two, on a multi-tenant workload.

    python -m benchmarks.router [--model smollm2-135m] [--tenants 4] [--questions 6] [--concurrency 4]
                                [--kv-cache-memory 48MiB] [--json out.json]

Each run starts its replicas (`python -m service.cli serve`, each pinned to its own core with
`taskset -c N` and one torch thread) and `python -m sglang_router.launch_router` in front of
them, then sends the workload through the router: `--tenants` long system prompts, each with
`--questions` short questions, shuffled (seeded) so the tenants interleave, as streamed chats from
`--concurrency` clients. The KV pool (`--kv-cache-memory`) is sized so that one replica holds the
prefixes of only some tenants: a router that keeps each tenant on one replica keeps its prefix
cached; one that spreads the tenants evicts them. Measured per run: requests per second, output
tokens per second, TTFT p50 / p99 (client side: request sent -> first streamed token), the
prefix-cache hit rate (tokens found / tokens looked up, summed over the replicas' /metrics) and
the requests each replica served. Printed (and with --json written), never asserted;
BENCHMARKS.md records a run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

RUNS = (("cache_aware", 2), ("round_robin", 2), ("cache_aware", 1))
TOPICS = ("paged KV caches", "river deltas", "medieval music", "tax law", "volcanoes", "chess openings",
          "bread baking", "satellite orbits")
START_TIMEOUT_S = 300


@dataclass
class RunResult:
    policy: str
    replicas: int
    requests: int
    failures: int
    wall_s: float
    req_per_s: float
    output_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    prefix_hit_rate: float
    requests_per_replica: list[int]


def system_prompt(tenant: int, run: str, words: int) -> str:
    """A long, tenant-specific system prompt; `run` makes every run's prompts new to the caches."""
    topic = TOPICS[tenant % len(TOPICS)]
    body = " ".join(f"Rule {i}: when asked about {topic}, cite fact {i * 7 + tenant} plainly." for i in range(words // 10))
    return f"[{run}] You are tenant {tenant}'s assistant for {topic}. {body}"


def workload(args, run: str) -> list[list[dict]]:
    chats = [[{"role": "system", "content": system_prompt(t, run, args.system_words)},
              {"role": "user", "content": f"Question {q}: what is rule {q + 3} about?"}]
             for t in range(args.tenants) for q in range(args.questions)]
    random.Random(args.seed).shuffle(chats)
    return chats


def wait_until(probe, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if probe():
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S}s")


def start_replica(args, core: int, port: int) -> subprocess.Popen:
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "service.cli", "serve", "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--kv-cache-memory", args.kv_cache_memory,
           "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    print("  replica:", " ".join(cmd[:3] + ["python"] + cmd[4:]), flush=True)
    return proc


def start_router(policy: str, urls: list[str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *urls, "--policy", policy, "--log-level", "warn"]
    print("  router: python", " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scrape(url: str) -> dict[str, float]:
    """Sums over variants of the counters this benchmark reads from one replica."""
    wanted = {"kvserve_prefix_cache_queries_total", "kvserve_prefix_cache_hits_total", "kvserve_requests_finished_total"}
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in wanted:
                totals[s.name] += s.value
    return totals


async def one_chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> tuple[float, int]:
    """(TTFT in seconds, output tokens) of one streamed chat."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - sent), tokens


async def drive(base_url: str, chats: list[list[dict]], concurrency: int, max_tokens: int):
    queue = list(chats)
    ttfts: list[float] = []
    tokens, failures = 0, 0
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def worker():
            nonlocal tokens, failures
            while queue:
                messages = queue.pop(0)
                try:
                    ttft, n = await one_chat(client, messages, max_tokens)
                    ttfts.append(ttft)
                    tokens += n
                except httpx.HTTPError:
                    failures += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, tokens, failures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def run_once(args, policy: str, replicas: int, port_base: int) -> RunResult:
    print(f"run: {policy}, {replicas} replica(s)", flush=True)
    urls = [f"http://127.0.0.1:{port_base + i}" for i in range(replicas)]
    procs = [start_replica(args, core=i, port=port_base + i) for i in range(replicas)]
    try:
        for p, u in zip(procs, urls):
            wait_until(lambda u=u: httpx.get(u + "/health", timeout=5).status_code == 200, "replica", p)
        router_url = f"http://127.0.0.1:{port_base + 10}"
        router = start_router(policy, urls, port_base + 10)
        procs.append(router)
        wait_until(lambda: all(w["is_healthy"] for w in httpx.get(router_url + "/workers", timeout=5).json()["workers"])
                   and len(httpx.get(router_url + "/workers", timeout=5).json()["workers"]) == replicas, "router", router)
        before = [scrape(u) for u in urls]
        start = time.perf_counter()
        ttfts, tokens, failures = asyncio.run(drive(router_url, workload(args, f"{policy}-{replicas}"),
                                                    args.concurrency, args.max_tokens))
        wall = time.perf_counter() - start
        after = [scrape(u) for u in urls]
    finally:
        for p in procs:
            p.kill()
            p.wait()

    def delta(name: str) -> list[float]:
        return [a[name] - b[name] for a, b in zip(after, before)]
    queries, hits = sum(delta("kvserve_prefix_cache_queries_total")), sum(delta("kvserve_prefix_cache_hits_total"))
    return RunResult(policy, replicas, len(ttfts), failures, round(wall, 2), round(len(ttfts) / wall, 3),
                     round(tokens / wall, 1), round(percentile(ttfts, 0.5) * 1000, 1),
                     round(percentile(ttfts, 0.99) * 1000, 1), round(hits / queries, 3) if queries else 0.0,
                     [int(x) for x in delta("kvserve_requests_finished_total")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--questions", type=int, default=6, help="questions per tenant")
    p.add_argument("--system-words", type=int, default=150, help="about this many words per system prompt")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--kv-cache-memory", default="48MiB",
                   help="each replica's KV pool (48 MiB: about 1,100 tokens of SmolLM2 in float32)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port-base", type=int, default=18700)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = [run_once(args, policy, n, args.port_base + 20 * i) for i, (policy, n) in enumerate(RUNS)]
    print(f"\n{'policy':<12} {'replicas':>8} {'req/s':>7} {'out tok/s':>9} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} "
          f"{'prefix hit':>10} {'per replica':>12} {'failed':>6}")
    for r in results:
        print(f"{r.policy:<12} {r.replicas:>8} {r.req_per_s:>7.2f} {r.output_tok_per_s:>9.1f} {r.ttft_p50_ms:>11.0f} "
              f"{r.ttft_p99_ms:>11.0f} {r.prefix_hit_rate:>10.3f} {str(r.requests_per_replica):>12} {r.failures:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
