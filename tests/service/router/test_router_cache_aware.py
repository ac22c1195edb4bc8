"""Requests that share a prefix stay together under a cache-aware router, and scatter under
round_robin: three tenants (a long system prompt each, several questions) through a real router in
front of two live tiny workers; where each tenant's prompts went is read from each worker's prefix
cache counters (tokens looked up, tokens found)."""
from __future__ import annotations

import httpx
import pytest

from tests.service.router.router_process import RouterProcess, prefix_counters

TENANTS = [f"Tenant {name} system prompt: you are the {name} assistant; answer in one line. " * 3
           for name in ("alpha", "bravo", "charlie")]
QUESTIONS = ["Where is my block?", "How long is the queue?", "Which step is this?", "Is the cache warm?"]


def send_tenant(router: RouterProcess, system: str) -> int:
    """Each question of one tenant as a chat, one after another; the prompt tokens they carried."""
    tokens = 0
    for q in QUESTIONS:
        body = {"model": "tiny", "max_tokens": 1,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
        r = httpx.post(router.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        tokens += r.json()["usage"]["prompt_tokens"]
    return tokens


def where_each_tenant_went(router: RouterProcess, workers, tenants: list[str]) -> list[list[tuple[float, float]]]:
    """Per tenant, per worker: (prompt tokens looked up, tokens found) while that tenant was sent."""
    placements = []
    for system in tenants:
        before = [prefix_counters(w) for w in workers]
        sent = send_tenant(router, system)
        deltas = [(q - q0, h - h0) for (q, h), (q0, h0) in zip((prefix_counters(w) for w in workers), before)]
        assert sum(q for q, _ in deltas) == sent  # every prompt token was looked up on some worker
        placements.append(deltas)
    return placements


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_cache_aware_keeps_each_tenant_on_one_worker(workers, kind):
    tenants = [f"[{kind}] {t}" for t in TENANTS]
    with RouterProcess(kind, [w.base_url for w in workers], "cache_aware") as router:
        for deltas in where_each_tenant_went(router, workers, tenants):
            looked_up = [q for q, _ in deltas]
            assert sorted(looked_up)[0] == 0, f"a tenant was split across workers: {deltas}"
            # on its worker, every question after the first found the system prompt cached
            hits = max(deltas)[1]
            system_blocks = (len(TENANTS[0]) // 16) * 16
            assert hits >= (len(QUESTIONS) - 1) * system_blocks * 0.9


def test_round_robin_splits_every_tenant(workers):
    tenants = [f"[rr] {t}" for t in TENANTS]
    with RouterProcess("sglang", [w.base_url for w in workers], "round_robin") as router:
        for deltas in where_each_tenant_went(router, workers, tenants):
            assert all(q > 0 for q, _ in deltas), f"round_robin kept a tenant on one worker: {deltas}"
