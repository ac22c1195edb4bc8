"""Per-token bookkeeping after sampling: detokenize, match stop conditions, build RequestOutputs.

Runs on the engine thread. A request with a grammar feeds it each token first (a token the grammar
refuses ends the request with an error; the sampler's mask makes that a bug, not an outcome).
Finish rules, in order: a stop token (EOS unless ignore_eos, or one of stop_token_ids; its text is
not returned) or a grammar that has ended (it allowed nothing but a stop token: the grammar's end
wins over ignore_eos), a stop string (cut before the match), max_tokens, then max_model_len (both
"length"). The first min_tokens tokens never end a request: the sampler bans stop tokens until then
(unless the grammar has ended) and their text is not searched for stop strings. Text that might
still begin a stop string is held back until it is ruled out, and released when the request ends
for another reason.
"""
from __future__ import annotations

from collections.abc import Callable

from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.outputs import RequestOutput, TokenLogprob
from service.engine.request import Request
from service.engine.stop_strings import StopStringMatcher


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)

    def new_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                    on_output: Callable[[RequestOutput], None]) -> Request:
        """A request with its own detokenizer and stop-string matcher."""
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        return Request(request_id, prompt_token_ids, params, arrival_time,
                       detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_token_ids,
                                                          skip_special_tokens=True),
                       on_output=on_output, stop_matcher=StopStringMatcher(params.stop) if params.stop else None,
                       stop_token_ids=stop_ids, prompt_logprobs=None if params.prompt_logprobs is None else [None])

    def on_token(self, req: Request, token_id: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        """Append one sampled token; the output says whether the request is now finished."""
        req.append_token(token_id)
        params = req.params
        lps = [logprob] if logprob is not None else None
        text = ""
        reason = None
        grammar_ended = False
        if req.grammar is not None:
            if not req.grammar.accept_token(token_id):
                return self.output(req, [token_id], self._release(req), "error", now, lps,
                                   error=f"internal error: the grammar refused token {token_id} that its mask allowed")
            grammar_ended = req.grammar.is_terminated()
        if grammar_ended or token_id in req.stop_token_ids:  # a set: stop_token_ids, and EOS unless ignore_eos
            reason = "stop"
            text = self._release(req)
        else:
            text = req.detokenizer.push([token_id])
            if req.stop_matcher is not None and req.num_output_tokens > params.min_tokens:
                text, matched = req.stop_matcher.push(text)
                if matched:
                    reason = "stop"
            if reason is None and (req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len):
                reason = "length"
                text += self._release(req)
        return self.output(req, [token_id], text, reason, now, lps)

    def _release(self, req: Request) -> str:
        """Everything still held back, at a finish that is not a stop-string match."""
        tail = req.detokenizer.flush()
        matcher = req.stop_matcher
        if matcher is None:
            return tail
        text, matched = matcher.push(tail)
        return text if matched else text + matcher.flush()

    def output(self, req: Request, token_ids: list[int], text: str, reason: str | None, now: float,
               logprobs: list[TokenLogprob] | None = None, error: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, new_token_ids=token_ids, new_text=text,
            finished=reason is not None, finish_reason=reason,
            prompt_tokens=req.num_prompt_tokens, completion_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens, logprobs=logprobs, error=error,
            prompt_logprobs=req.prompt_logprobs if token_ids and req.num_output_tokens == 1 else None,
            arrival_time=req.arrival_time, first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time, time=now,
        )
