"""One generation request as the engine tracks it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from model.sampling_params import SamplingParams, TokenLogprob
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.outputs import RequestOutput
from service.engine.stop_strings import StopStringMatcher
from service.engine.structured_output import TokenMatcher


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(slots=True, eq=False)
class Request:
    """Token ids and progress of one request.

    Invariant: num_computed_tokens <= num_tokens; the K/V of the first num_computed_tokens tokens
    of all_token_ids (prompt, then outputs) live in this request's blocks. A running decode has
    num_computed_tokens == num_tokens - 1: the last sampled token is fed in the next step.
    Preemption resets num_computed_tokens to 0 and keeps the outputs (recompute).
    """
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    detokenizer: IncrementalDetokenizer
    on_output: Callable[[RequestOutput], None]  # thread-safe hop to the caller's event loop
    stop_matcher: StopStringMatcher | None = None
    stop_token_ids: frozenset[int] = frozenset()  # stop_token_ids, and EOS unless ignore_eos
    generator: torch.Generator | None = None    # seeded sampling; used only on the engine thread
    grammar: TokenMatcher | None = None         # structured output: fed every sampled token; released at the end
    cache_salt: bytes | None = None              # prefix-cache tenant: blocks are shared only under equal salts
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs: [None, one per token scored]
    all_token_ids: list[int] = field(default_factory=list)  # prompt then outputs; filled in __post_init__
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0           # prefix-cache hit at first admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
