"""What one HTTP request did, for its access log line: set up by service.api.middleware, filled in
by the code that runs its engine requests (service.api.generation), read when the answer is sent.

`current_record` is a ContextVar: the handler, and every task it starts (streams, pumps), sees the
record of the request it serves. No FastAPI here.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from service.engine.outputs import RequestOutput


@dataclass(slots=True)
class RequestRecord:
    """Tokens and latency of one HTTP request's engine requests (n choices x prompts: summed, like
    kvserve_prompt_tokens_total and kvserve_generation_tokens_total count them)."""
    request_id: str
    variant: str | None = None
    ttft_s: float | None = None           # engine arrival -> the first token of any choice
    _prompt: dict[str, int] = field(default_factory=dict)
    _output: dict[str, int] = field(default_factory=dict)

    def note(self, variant: str, out: RequestOutput) -> None:
        self.variant = variant
        self._prompt[out.request_id] = out.prompt_tokens
        self._output[out.request_id] = out.completion_tokens
        if out.first_token_time is not None:
            ttft = out.first_token_time - out.arrival_time
            self.ttft_s = ttft if self.ttft_s is None else min(self.ttft_s, ttft)

    @property
    def prompt_tokens(self) -> int | None:
        return sum(self._prompt.values()) if self._prompt else None

    @property
    def output_tokens(self) -> int | None:
        return sum(self._output.values()) if self._output else None


current_record: ContextVar[RequestRecord | None] = ContextVar("kvserve_request_record", default=None)
