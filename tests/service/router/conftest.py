"""Fixtures of the router tests: two live tiny workers with no API key, started side by side."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.service.live_server import LiveServer

pytest.importorskip("sglang_router")
pytest.importorskip("vllm_router")

# the decode-path probes skipped (fixed choices): the workers start in seconds
WORKER_ARGS = ("--kv-cache-memory", "4MiB", "--max-model-len", "512", "--single-thread-tokens", "0", "--sdpa-decode-seqs", "0")


def start_workers(n: int = 2) -> list[LiveServer]:
    servers = [LiveServer(*WORKER_ARGS) for _ in range(n)]
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(s.start) for s in servers]
    try:
        for f in futures:
            f.result()
    except BaseException:
        stop_workers(servers)
        raise
    return servers


def stop_workers(servers: list[LiveServer]) -> None:
    for s in servers:
        if getattr(s, "proc", None) is not None:
            s.kill()


@pytest.fixture(scope="session")
def workers() -> Iterator[list[LiveServer]]:
    """Two tiny workers shared by the router tests that leave them running (killed, not drained,
    at the end); a test that kills a worker starts its own (start_workers)."""
    servers = start_workers()
    yield servers
    stop_workers(servers)
