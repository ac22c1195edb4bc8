"""The streaming client of the load generator: one request, timed chunk by chunk.

Speaks plain OpenAI: `/v1/completions` or `/v1/chat/completions` with `stream: true` and
`stream_options.include_usage`, reads the SSE events `data: {json}` up to `data: [DONE]`, and keeps
every content chunk's arrival time. The output token count comes from the final usage chunk when the
server sends one; otherwise each content chunk counts as one token (true for servers that stream
token by token). No field of any one server is required.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from service.bench.datasets import SampleRequest

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request. Times are `time.perf_counter()` seconds."""
    index: int
    prompt_len: int                  # usage.prompt_tokens when reported, else the dataset's estimate
    max_tokens: int
    start: float = 0.0               # request sent
    end: float = 0.0                 # response finished (or failed)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    output_tokens: int = 0
    usage_reported: bool = False
    status: int = 0                  # HTTP status; 0 when no response came (connection error)
    error: str = ""
    text: str = ""

    @property
    def success(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float:
        """Sent -> first chunk with text (the whole latency when no text came)."""
        return (self.chunk_times[0] if self.chunk_times else self.end) - self.start

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1); undefined for a single output token."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: the server, the route, the model and the sampling the run asks for."""
    base_url: str
    endpoint: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, req: SampleRequest) -> dict:
        body: dict = {"model": self.model, "max_tokens": req.max_tokens, "temperature": self.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint == "/v1/chat/completions":
            messages = [] if req.system is None else [{"role": "system", "content": req.system}]
            body["messages"] = messages + [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.completion_prompt()
        if self.ignore_eos:
            body["ignore_eos"] = True  # an extension vLLM and kvserve accept; others ignore it
        return body


def chunk_text(chunk: dict) -> str:
    """The text of one streamed chunk: `choices[0].text` or `choices[0].delta.content`."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error")
        return str(err.get("message") if isinstance(err, dict) else err or raw.decode(errors="replace"))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:200] or "empty response"


async def send_request(http: httpx.AsyncClient, target: Target, req: SampleRequest, index: int) -> RequestRecord:
    """Send one streaming request and time it. Never raises for a server or network failure."""
    rec = RequestRecord(index=index, prompt_len=req.prompt_len, max_tokens=req.max_tokens)
    pieces: list[str] = []
    rec.start = time.perf_counter()
    try:
        async with http.stream("POST", target.base_url + target.endpoint, json=target.body(req),
                               headers=target.headers()) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = _error_message(await resp.aread())
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    rec.error = f"unexpected event {data[:80]!r}"
                    break
                if "error" in chunk:  # an error reported inside a 200 stream
                    err = chunk["error"]
                    rec.error = str(err.get("message") if isinstance(err, dict) else err)
                    break
                text = chunk_text(chunk)
                if text:
                    rec.chunk_times.append(now)
                    pieces.append(text)
                usage = chunk.get("usage")
                if usage:
                    rec.usage_reported = True
                    rec.output_tokens = int(usage.get("completion_tokens") or 0)
                    rec.prompt_len = int(usage.get("prompt_tokens") or rec.prompt_len)
    except (httpx.HTTPError, httpx.StreamError, ValueError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    finally:
        rec.end = time.perf_counter()
        rec.text = "".join(pieces)
        if not rec.usage_reported:
            rec.output_tokens = len(rec.chunk_times)
    return rec
