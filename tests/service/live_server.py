"""Helpers of the live-server tests (no tests, no fixtures here: tests/service/conftest.py has those).

`LiveServer` runs the real command line, `python -m service.cli serve --model tiny ...`, in a
subprocess on a port the OS picks (`--port 0`; the server logs the one it got), so every test
talks HTTP to uvicorn exactly as a user would. Also: an independent SSE reader, a /metrics
scrape parsed with prometheus_client's parser, and `TinyReference`, the greedy reference of the
tiny model (the same prompt through the no-cache forward, one token at a time).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.reference import greedy_no_cache

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SHARED_MAX_MODEL_LEN = 160
_LISTENING = re.compile(r"kvserve listening on (http://[\d.]+:\d+)")
START_TIMEOUT_S = 180   # a guard against a hung start-up, not a timing assertion
WAIT_TIMEOUT_S = 60


class LiveServer:
    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = ["--model", "tiny", "--dtype", "float32", "--host", "127.0.0.1", "--port", "0",
                     "--log-level", "info", *args]
        # One intra-op thread: on a 2-core machine shared with other test processes, torch's
        # spinning worker threads make a tiny model's steps 10-50x slower, not faster.
        self.env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self.base_url = ""
        self._ready = threading.Event()

    def start(self) -> LiveServer:
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *self.args], cwd=REPO,
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or not self.base_url:
            self.kill()
            raise RuntimeError("server did not start:\n" + self.log)
        return self

    def _read_output(self) -> None:
        for line in self.proc.stdout:  # drained continuously so the pipe never blocks the server
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not self.base_url:
                self.base_url = match.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def url(self, path: str) -> str:
        return self.base_url + path

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT_TIMEOUT_S) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- observing it ----

    def metrics(self) -> dict[tuple, float]:
        """One scrape: {(sample name, sorted (label, value) pairs): value}."""
        text = httpx.get(self.url("/metrics"), timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        """The value of the one series of `name` whose labels include `labels` (every kvserve series
        also carries the constant `model_name`, which callers need not repeat)."""
        return only_match(self.metrics(), name, **labels)

    def wait_for_metric(self, name: str, expected: float, **labels) -> None:
        wait_until(lambda: self.metric(name, **labels) == expected,
                   f"{name}{labels} never became {expected}")


def only_match(samples: dict[tuple, float], name: str, **labels) -> float:
    """From a {(name, sorted labels): value} scrape, the value of the one series of `name` whose
    labels include `labels`; fails if none or several match."""
    want = {k: str(v) for k, v in labels.items()}
    found = [value for (n, pairs), value in samples.items() if n == name and want.items() <= dict(pairs).items()]
    if len(found) != 1:
        raise KeyError(f"{len(found)} series of {name} match {want}")
    return found[0]


class InProcessServer:
    """The app served by uvicorn on a thread of this process, its engines started here."""

    def __init__(self, state):
        import uvicorn

        from service.api import create_app
        self.state = state
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="off"))
        self.base_url = ""

    def start(self) -> InProcessServer:
        for engine in self.state.engines.values():
            engine.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        from service.server import stop_engines
        self.server.should_exit = True
        self.thread.join(30)
        stop_engines(self.state)


def open_raw_request(base_url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a plain socket and return it unread: closing it is a client disconnect."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(data), data))
    return sock


def wait_until(predicate, message: str, timeout: float = WAIT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.02)


def read_sse(body: str) -> list[str]:
    """The data of each event of a text/event-stream body (events end at a blank line)."""
    events = []
    for block in body.split("\n\n"):
        if block.strip():
            events.append("\n".join(line[5:].removeprefix(" ") for line in block.split("\n")
                                    if line.startswith("data:")))
    return events


@contextmanager
def one_thread():
    """torch on one intra-op thread for a block (see LiveServer: the same reason), then as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TinyReference:
    """What `--model tiny --dtype float32` serves (the `tiny` fixture: PRESETS["tiny"], random weights
    of seed 0, the byte-level tokenizer), used as the independent reference of the live tests."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._variants = {"native": model}

    def variant(self, name: str):
        if name not in self._variants:
            from model.variants import with_variant
            self._variants[name] = with_variant(self.model, name)
        return self._variants[name]

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_tokens: int, *, ignore_eos: bool = True,
               variant: str = "native") -> tuple[list[int], list[torch.Tensor]]:
        """Greedy tokens through the no-cache forward (whole sequence recomputed each token), and the
        log-softmax each was chosen from."""
        stop_ids = frozenset() if ignore_eos else self.tokenizer.eos_token_ids
        with one_thread():
            return greedy_no_cache(self.variant(variant), prompt_ids, max_tokens, stop_ids=stop_ids)

    def text(self, token_ids: list[int]) -> str:
        """What a client sees for these tokens: special tokens (and so a final EOS) are not text."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                     add_special_tokens=False)
