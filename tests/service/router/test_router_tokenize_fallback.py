"""vllm-router's second way to the token ids of a prompt: when a worker's /render routes fail, its
cache_aware policy posts its own /tokenize bodies, and reads kvserve's answer. A proxy in this
process hides /render (404) and passes everything else to a live tiny worker."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.service.router.router_process import RouterProcess


def without_render(target: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            size = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(size) if size else None
            if self.path.endswith("/render"):
                status, data = 404, b'{"error": "hidden by the test"}'
            else:
                r = httpx.request(self.command, target + self.path, content=body, timeout=60,
                                  headers={"Content-Type": "application/json"})
                status, data = r.status_code, r.content
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def proxied_worker(workers):
    proxy = without_render(workers[0].base_url)
    yield workers[0], f"http://127.0.0.1:{proxy.server_address[1]}"
    proxy.shutdown()


def routing_inputs(router: RouterProcess) -> dict[str, float]:
    return {line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in router.metrics().splitlines() if line.startswith("vllm_router_kv_routing_inputs_total")}


def test_vllm_router_falls_back_to_kvserve_tokenize(proxied_worker):
    worker, proxy_url = proxied_worker
    with RouterProcess("vllm", [proxy_url], "cache_aware") as router:
        completion = {"model": "tiny", "prompt": "Which block holds token 17?", "max_tokens": 2}
        chat = {"messages": [{"role": "user", "content": "Which block holds token 17?"}], "max_tokens": 2}
        assert httpx.post(router.base_url + "/v1/completions", json=completion, timeout=60).status_code == 200
        assert httpx.post(router.base_url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        inputs = routing_inputs(router)
    assert inputs.get("tokenize") == 2 and "render" not in inputs, inputs
    assert worker.log.count("POST /tokenize 200") >= 2 and "ignored unknown fields" not in worker.log
