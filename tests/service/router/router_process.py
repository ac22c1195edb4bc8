"""Helpers of the router tests (no tests here): a real sglang-router or vllm-router in a subprocess.

`RouterProcess` runs the installed router's own launcher (`python -m sglang_router.launch_router`
or `python -m vllm_router.launch_router`) on free ports of 127.0.0.1 and waits until it lists
every worker as healthy, so a test starts routing only once the router would. Its output is
drained continuously (a full pipe would block the router) and kept for failure messages.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.service.live_server import REPO, START_TIMEOUT_S, LiveServer, only_match

LAUNCHERS = {"sglang": "sglang_router.launch_router", "vllm": "vllm_router.launch_router"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterProcess:
    def __init__(self, kind: str, worker_urls: list[str], policy: str, *args: str):
        self.kind = kind
        self.port, self.metrics_port = free_port(), free_port()
        self.args = ["-m", LAUNCHERS[kind], "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls",
                     *worker_urls, "--policy", policy, "--prometheus-host", "127.0.0.1",
                     "--prometheus-port", str(self.metrics_port), *args]
        self.workers = worker_urls
        self.lines: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self) -> RouterProcess:
        self.proc = subprocess.Popen([sys.executable, *self.args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._all_workers_healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.kind}-router did not come up:\n{self.log}")
            time.sleep(0.1)
        return self

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def _all_workers_healthy(self) -> bool:
        try:
            listed = httpx.get(self.base_url + "/workers", timeout=5).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        healthy = {w["url"] for w in listed if w.get("is_healthy")}
        return healthy >= set(self.workers)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def prefix_counters(worker: LiveServer) -> tuple[float, float]:
    """(prompt tokens looked up in the prefix cache, tokens found there) so far on one worker."""
    scrape = worker.metrics()
    return (only_match(scrape, "kvserve_prefix_cache_queries_total"),
            only_match(scrape, "kvserve_prefix_cache_hits_total"))
