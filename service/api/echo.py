"""`echo` and prompt logprobs on /v1/completions: what a choice shows of its prompt.

OpenAI's legacy `echo: true` puts the prompt before the completion's text and, with `logprobs`,
its tokens before the completion's in `logprobs` (the first prompt token has no logprob: `null`,
as OpenAI and vLLM answer); `max_tokens: 0` with echo answers the prompt alone (the engine samples
one token, which the answer leaves out and does not count). vLLM's `prompt_logprobs: k` adds, per
choice, a list with one entry per prompt token (`null` first): {token id: {logprob, rank,
decoded_token}} for the prompt's token and the k likeliest. lm-evaluation-harness scores
multiple-choice tasks with echo + logprobs. The values come from the engine
(service.engine.prompt_logprobs). No FastAPI here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model.sampling_params import TokenLogprob
from service.api.protocol_logprobs import CompletionLogprobs, PromptLogprob, clamp_logprob

TokenStrings = Callable[[list[int]], list[str]]


@dataclass(frozen=True, slots=True)
class Echo:
    """Per choice (prompt-major, as the engine requests run): its prompt's text and ids."""
    texts: list[str]
    ids: list[list[int]]
    echo: bool                   # the prompt before the completion
    logprobs: int | None         # with echo: the prompt tokens' logprobs and top-k in `logprobs`
    prompt_logprobs: int | None  # vLLM's prompt_logprobs
    prompt_only: bool            # max_tokens 0: nothing generated is shown
    token_strings: TokenStrings
    decode: Callable[[list[int]], str]

    def text(self, i: int, completion: str) -> str:
        return (self.texts[i] if self.echo else "") + ("" if self.prompt_only else completion)

    def logprobs_of(self, i: int, entries: list[TokenLogprob | None] | None,
                    completion: CompletionLogprobs | None) -> CompletionLogprobs | None:
        """`completion`'s logprobs after those of the prompt (with echo; `entries` from the first output)."""
        if completion is None:
            return None
        if self.prompt_only:
            completion = CompletionLogprobs()
        if not self.echo or entries is None:
            return completion
        names = self.token_strings(self.ids[i])
        offsets, pos = [], 0
        for name in names:
            offsets.append(pos)
            pos += len(name)
        k = self.logprobs or 0
        tops: list[dict[str, float] | None] = [None]
        for e in entries[1:]:
            assert e is not None
            tops.append({n: clamp_logprob(v) for n, (_, v) in zip(self.token_strings([t for t, _ in e.top[:k]]), e.top)})
        return CompletionLogprobs(
            tokens=names + completion.tokens,
            token_logprobs=[None] + [clamp_logprob(e.logprob) for e in entries[1:] if e is not None]
            + completion.token_logprobs,
            top_logprobs=tops + list(completion.top_logprobs or []),
            text_offset=offsets + [pos + o for o in completion.text_offset])

    def vllm(self, entries: list[TokenLogprob | None] | None) -> list[dict[str, PromptLogprob] | None] | None:
        if self.prompt_logprobs is None or entries is None:
            return None
        out: list[dict[str, PromptLogprob] | None] = [None]
        for e in entries[1:]:
            assert e is not None
            item = {str(e.token_id): PromptLogprob(logprob=clamp_logprob(e.logprob), rank=e.rank,
                                                   decoded_token=self.decode([e.token_id]))}
            for rank, (t, v) in enumerate(e.top[:self.prompt_logprobs], start=1):
                item.setdefault(str(t), PromptLogprob(logprob=clamp_logprob(v), rank=rank, decoded_token=self.decode([t])))
            out.append(item)
        return out
