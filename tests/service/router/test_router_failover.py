"""A worker dies behind sglang-router or vllm-router (cache_aware) while it runs requests: a JSON
request in flight on it is answered (the routers retry it on the other worker) or is an HTTP
error the router answers; a stream in flight on it ends, finished or cut short, never hangs; every
request after the kill succeeds, on the surviving worker."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.live_server import only_match, wait_until
from tests.service.router.conftest import start_workers, stop_workers
from tests.service.router.router_process import RouterProcess, prefix_counters

SYSTEM = "You answer questions about paged KV caches in one short sentence. " * 4
IN_FLIGHT = 3
AFTER_KILL = 10


def stream_outcome(router: RouterProcess, question: str) -> str:
    """How one stream in flight ended: "done" ([DONE] arrived), "cut" (closed before it) or "http <status>"."""
    body = {"model": "tiny", "prompt": SYSTEM + question, "max_tokens": 150, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", router.base_url + "/v1/completions", json=body, timeout=60) as r:
            if r.status_code != 200:
                return f"http {r.status_code}"
            return "done" if any(line == "data: [DONE]" for line in r.iter_lines()) else "cut"
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return "cut"


def ask(router: RouterProcess, question: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": "tiny", "prompt": SYSTEM + question, "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(router.base_url + "/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_a_dead_worker_costs_only_its_requests_in_flight(kind):
    workers = start_workers()
    try:
        with RouterProcess(kind, [w.base_url for w in workers], "cache_aware", "--health-check-interval-secs", "1",
                           "--health-failure-threshold", "1", "--cb-failure-threshold", "2") as router:
            before = [prefix_counters(w)[0] for w in workers]
            assert all(ask(router, f"Question {i}?").status_code == 200 for i in range(3))
            grew = [prefix_counters(w)[0] > b for w, b in zip(workers, before)]
            assert grew.count(True) == 1, "the prefix should have stayed on one worker"
            holder, survivor = (workers[0], workers[1]) if grew[0] else (workers[1], workers[0])

            with ThreadPoolExecutor(IN_FLIGHT) as pool:
                running = [pool.submit(ask, router, f"Long question {i}?", 150) for i in range(IN_FLIGHT - 1)]
                streamed = pool.submit(stream_outcome, router, "Long streamed question?")
                wait_until(lambda: only_match(holder.metrics(), "kvserve_num_requests_running") >= 1,
                           "no request of the prefix reached its worker")
                holder.kill()
                in_flight = [f.result().status_code for f in running]  # no hang: each answered
                stream_end = streamed.result()
            assert all(s == 200 or s >= 500 for s in in_flight), in_flight
            assert stream_end in ("done", "cut") or stream_end.startswith("http 5"), stream_end

            survivor_before = prefix_counters(survivor)[0]
            answers = [ask(router, f"Question {i} after the failure?") for i in range(AFTER_KILL)]
            print(kind, "in flight at the kill:", in_flight, stream_end, "after:", [r.status_code for r in answers])
            assert [r.status_code for r in answers] == [200] * AFTER_KILL
            served = sum(r.json()["usage"]["prompt_tokens"] for r in answers)
            assert prefix_counters(survivor)[0] - survivor_before == served
    finally:
        stop_workers(workers)
