"""Iteration-level scheduler: which requests run this step, and how many of their tokens.

Works on ints and lists only; the KV cache manager owns the blocks. Each `schedule()`:
1. running requests first, in admission order: each gets its remaining tokens (one for a decode,
   a chunk of its prompt for a chunked prefill) within the step's token budget. When the pool
   cannot hold them, the most recently admitted running request is preempted (recompute: its
   blocks are freed, it goes back to the front of the waiting queue with its outputs kept).
2. then, if nothing was preempted, waiting requests are admitted in arrival order while the
   running batch has room (max_num_seqs), the budget lasts and the pool can hold their first
   chunk; a prefix-cache hit reuses cached blocks and skips computing those tokens.
Invariant: a request is in exactly one of `waiting`, `running` or neither (finished).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvcache.manager import KVCacheManager
from service.engine.prompt_logprobs import usable_prefix_tokens
from service.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so a new token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + num_new):
                victim = self.running[-1]  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # it preempted itself: nothing after it is left either
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            blocks, num_hit = self.kv.get_computed_blocks(req.all_token_ids, req.cache_salt)
            usable = usable_prefix_tokens(req, num_hit, self.kv.block_size)
            if usable < num_hit:  # it still needs prompt logprobs of positions the hit would skip
                blocks, num_hit = blocks[:usable // self.kv.block_size], usable
            num_new = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req.request_id, num_hit + num_new, blocks):
                break
            self.waiting.popleft()
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.admitted.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Take a request out of the queues and free its blocks; idempotent."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass  # never reached the scheduler
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
