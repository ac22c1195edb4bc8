"""What the engine hands back to its callers, one object per step per request."""
from __future__ import annotations

from dataclasses import dataclass

from model.sampling_params import TokenLogprob  # built by the sampler


@dataclass(slots=True)
class RequestOutput:
    """The increment of one request since its previous output.

    `new_text` is safe to show: never half a UTF-8 character, never a part of a stop string that
    might still match. Concatenating every `new_text` of a request gives its final text.
    finish_reason: None while running, else "stop", "length", "abort", "timeout" or "error".
    Timestamps are time.monotonic() seconds.
    """
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output, when asked for
    error: str | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time: float = 0.0
