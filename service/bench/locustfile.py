"""A locustfile for people who already load-test with locust: users that stream completions.

    locust -f service/bench/locustfile.py --host http://127.0.0.1:8000

Each user sends streaming requests to an OpenAI-compatible server and reports, besides locust's own
entry for the POST (which times the response headers only, as streamed requests do in locust),
custom entries of request type "SSE" whose response times are in milliseconds:
- "TTFT": request sent -> first chunk with text;
- "ITL": the gap between consecutive text chunks (one sample per gap);
- "TPOT": (e2e - TTFT) / (output tokens - 1) per request with at least two output tokens;
- "E2E": request sent -> stream finished (failures land here, with the reason).

Settings from the environment:
    BENCH_ENDPOINT      /v1/completions (default) or /v1/chat/completions
    BENCH_MODEL         model id (default: the first of /v1/models)
    BENCH_API_KEY       sent as a Bearer token
    BENCH_DATASET       natural (default) or random
    BENCH_INPUT_LEN     approx prompt tokens for the random dataset (default 128)
    BENCH_MAX_TOKENS    max_tokens per request (default 128)
    BENCH_IGNORE_EOS    1 to send ignore_eos: true (vLLM/kvserve extension)
    BENCH_NUM_PROMPTS   prompts to cycle through (default 200)
    BENCH_SEED          dataset seed (default 0)
"""
from __future__ import annotations

import itertools
import json
import os
import time

from locust import HttpUser, between, task

from service.bench.client import ENDPOINTS, Target, chunk_text
from service.bench.datasets import natural_requests, random_requests


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be an integer") from None
    if value < 1:
        raise ValueError(f"{name}={value} is out of range: must be >= 1")
    return value


ENDPOINT = os.environ.get("BENCH_ENDPOINT", "/v1/completions")
if ENDPOINT not in ENDPOINTS:
    raise ValueError(f"BENCH_ENDPOINT={ENDPOINT!r}: use one of {', '.join(ENDPOINTS)}")
DATASET = os.environ.get("BENCH_DATASET", "natural")
if DATASET not in ("natural", "random"):
    raise ValueError(f"BENCH_DATASET={DATASET!r}: use natural or random")
MAX_TOKENS = _env_int("BENCH_MAX_TOKENS", 128)
SEED = int(os.environ.get("BENCH_SEED", "0") or 0)
NUM_PROMPTS = _env_int("BENCH_NUM_PROMPTS", 200)
PROMPTS = (natural_requests(NUM_PROMPTS, MAX_TOKENS, seed=SEED) if DATASET == "natural" else
           random_requests(NUM_PROMPTS, _env_int("BENCH_INPUT_LEN", 128), MAX_TOKENS, 0.0, seed=SEED))


class StreamingUser(HttpUser):
    """Sends one streaming request after another, with a short think time between them."""
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        api_key = os.environ.get("BENCH_API_KEY") or None
        model = os.environ.get("BENCH_MODEL")
        if not model:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            with self.client.get("/v1/models", headers=headers, name="/v1/models", catch_response=True) as resp:
                model = resp.json()["data"][0]["id"] if resp.status_code == 200 else "default"
        self.target = Target("", ENDPOINT, model, api_key, os.environ.get("BENCH_IGNORE_EOS") == "1")
        self.prompts = itertools.cycle(PROMPTS)

    def _fire(self, name: str, seconds: float, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type="SSE", name=name, response_time=seconds * 1000.0,
                                             response_length=0, exception=exception, context={})

    @task
    def stream_completion(self) -> None:
        req = next(self.prompts)
        chunk_times: list[float] = []
        output_tokens = 0
        error: Exception | None = None
        start = time.perf_counter()
        with self.client.post(ENDPOINT, json=self.target.body(req), headers=self.target.headers(), stream=True,
                              catch_response=True, name=ENDPOINT) as resp:
            if resp.status_code != 200:
                error = RuntimeError(f"status {resp.status_code}: {resp.text[:200]}")
                resp.failure(error)
            else:
                resp.success()
                for line in resp.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = RuntimeError(str(chunk["error"]))
                        break
                    if chunk_text(chunk):
                        chunk_times.append(time.perf_counter())
                    if chunk.get("usage"):
                        output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        end = time.perf_counter()
        self._fire("E2E", end - start, error)
        if error is not None:
            return
        output_tokens = output_tokens or len(chunk_times)
        if chunk_times:
            self._fire("TTFT", chunk_times[0] - start)
        for a, b in zip(chunk_times, chunk_times[1:]):
            self._fire("ITL", b - a)
        if output_tokens > 1 and chunk_times:
            self._fire("TPOT", (end - chunk_times[0]) / (output_tokens - 1))
