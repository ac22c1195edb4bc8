"""One step's model work with every failure kept to the request it belongs to: forward, then sample.

A batched forward that raises is retried one request at a time (rewriting the same KV slots is
harmless) and only the requests that fail again are failed; a batch whose sampling raises is
sampled row by row, so one bad row (e.g. a broken grammar matcher) fails only its request. The
engine (service/engine/engine.py) owns the requests: failing one is its `fail` callback.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from model.sampler import Sampler, TokenMasks
from model.sampling_params import TokenLogprob
from service.engine.request import Request
from service.engine.runner import ModelRunner
from service.engine.scheduler import ScheduledRequest
from service.engine.structured_output import GrammarCompiler

log = logging.getLogger("kvserve.engine")


class IsolatedStep:
    def __init__(self, runner: ModelRunner, sampler: Sampler, grammars: GrammarCompiler,
                 fail: Callable[[Request, str], None], name: str):
        self.runner, self.sampler, self.grammars = runner, sampler, grammars
        self.fail = fail  # ends a request with finish_reason "error" and this message
        self.name = name  # the engine's, for the logs

    def forward(self, scheduled: list[ScheduledRequest]) -> tuple[list[ScheduledRequest], Tensor]:
        """The step's logits, one row per request that samples, and the requests that ran (those
        whose forward failed alone are failed and left out)."""
        try:
            return scheduled, self.runner.execute(scheduled)
        except Exception as exc:
            if len(scheduled) == 1:
                self._fail_step(scheduled[0], exc)
                return [], torch.empty(0)
            log.exception("batched forward failed in engine %s; retrying its %d requests one by one",
                          self.name, len(scheduled))
        kept, rows = [], []
        for s in scheduled:
            try:
                logits = self.runner.execute([s])
            except Exception as exc:
                self._fail_step(s, exc)
                continue
            kept.append(s)
            if s.samples:
                rows.append(logits)
        return kept, torch.cat(rows) if rows else torch.empty(0)

    def _fail_step(self, s: ScheduledRequest, exc: Exception) -> None:
        log.error("model step failed for request %s in engine %s: %s", s.request.request_id, self.name, exc)
        self.fail(s.request, f"internal error during the model step: {exc}")

    def sample(self, logits: Tensor, sampling: list[Request]) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """One token per request (None where sampling failed; that request is failed). The batch is
        sampled at once; if that raises, row by row."""
        if not sampling:
            return [], []
        try:
            return self._sample_rows(logits, sampling)  # type: ignore[return-value]
        except Exception:
            log.exception("batched sampling failed in engine %s; sampling its %d rows one by one",
                          self.name, len(sampling))
        tokens: list[int | None] = []
        logprobs: list[TokenLogprob | None] = []
        for i, req in enumerate(sampling):
            try:
                (token,), (logprob,) = self._sample_rows(logits[i:i + 1], [req])
            except Exception as exc:
                self.fail(req, f"internal error while sampling: {exc}")
                token, logprob = None, None
            tokens.append(token)
            logprobs.append(logprob)
        return tokens, logprobs

    def _sample_rows(self, logits: Tensor, sampling: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        return self.sampler.sample(logits, [r.params for r in sampling], [r.prompt_token_ids for r in sampling],
                                   [r.output_token_ids for r in sampling], [r.generator for r in sampling],
                                   self._token_masks(sampling))

    def _token_masks(self, sampling: list[Request]) -> TokenMasks | None:
        """This step's masks: each grammar's allowed tokens, and stop tokens banned before min_tokens."""
        rows = [j for j, r in enumerate(sampling) if r.grammar is not None]
        banned = {j: sorted(r.stop_token_ids) for j, r in enumerate(sampling)
                  if r.num_output_tokens < r.params.min_tokens}
        if not rows and not banned:
            return None
        bitmask = None
        if rows:
            bitmask = torch.empty((len(rows), self.grammars.bitmask_width), dtype=torch.int32)
            for g, j in enumerate(rows):
                sampling[j].grammar.fill_next_token_bitmask(bitmask, g)  # type: ignore[union-attr]
        return TokenMasks(bitmask, rows, banned)
