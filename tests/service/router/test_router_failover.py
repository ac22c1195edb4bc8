"""A worker dies behind sglang-router (cache_aware): the requests of its prefix fail only while the
router still sends them there, each as an HTTP error the router answers (never a hang or a dropped
connection), and from the first success on every request succeeds on the surviving worker."""
from __future__ import annotations

import httpx

from tests.service.router.conftest import start_workers, stop_workers
from tests.service.router.router_process import RouterProcess, prefix_counters

SYSTEM = "You answer questions about paged KV caches in one short sentence. " * 4
AFTER_KILL = 12
# The router marks a worker down after this many failed requests (its circuit breaker) or health checks
ROUTER_FAILURES = 2


def ask(router: RouterProcess, question: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": SYSTEM + question, "max_tokens": 2}
    return httpx.post(router.base_url + "/v1/completions", json=body, timeout=60)


def test_a_dead_worker_costs_only_the_requests_the_router_fails():
    workers = start_workers()
    try:
        with RouterProcess("sglang", [w.base_url for w in workers], "cache_aware",
                           "--cb-failure-threshold", str(ROUTER_FAILURES), "--health-check-interval-secs", "1",
                           "--health-failure-threshold", "1") as router:
            before = [prefix_counters(w)[0] for w in workers]
            assert all(ask(router, f"Question {i}?").status_code == 200 for i in range(3))
            grew = [prefix_counters(w)[0] > b for w, b in zip(workers, before)]
            assert grew.count(True) == 1, "the prefix should have stayed on one worker"
            holder, survivor = (workers[0], workers[1]) if grew[0] else (workers[1], workers[0])
            holder.kill()
            survivor_before = prefix_counters(survivor)[0]

            answers = [ask(router, f"Question {i} after the failure?") for i in range(AFTER_KILL)]
            statuses = [r.status_code for r in answers]
            first_ok = statuses.index(200)
            assert first_ok <= ROUTER_FAILURES and all(s >= 500 for s in statuses[:first_ok]), statuses
            assert statuses[first_ok:] == [200] * (AFTER_KILL - first_ok), statuses
            served = sum(r.json()["usage"]["prompt_tokens"] for r in answers[first_ok:])
            assert prefix_counters(survivor)[0] - survivor_before == served
    finally:
        stop_workers(workers)
