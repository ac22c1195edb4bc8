"""The answers of the generation endpoints, built from engine outputs: JSON bodies and SSE streams.

For OpenAI's completions and chat completions (OpenAIAnswer) and the native `/generate`
(GenerateAnswer): a whole response from every output of every choice, and a stream of
ready-framed server-sent events from (choice index, output) pairs as they arrive. A choice that
fails mid-stream is followed by an error event. No FastAPI here.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.api.protocol import SSE_DONE, error_body, sse_event
from service.api.protocol_logprobs import chat_logprobs, completion_logprobs
from service.api.protocol_native import GenerateDetails, GeneratedToken, GenerateResponse, GenerateStreamEvent, Timings
from service.api.protocol_openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Delta,
    PromptTokensDetails,
    Usage,
)
from service.engine.outputs import RequestOutput

TokenStrings = Callable[[list[int]], list[str]]
ChoiceEvents = AsyncIterator[tuple[int, RequestOutput]]


def logprob_entries(outs: list[RequestOutput]) -> list:
    return [lp for o in outs for lp in (o.logprobs or [])]


def usage(outputs_by_choice: list[list[RequestOutput]], n: int) -> Usage:
    """Each distinct prompt counted once (its n choices share it)."""
    lasts = [outs[-1] for outs in outputs_by_choice]
    groups = [lasts[i:i + n] for i in range(0, len(lasts), n)]
    prompt = sum(g[0].prompt_tokens for g in groups)
    completion = sum(o.completion_tokens for o in lasts)
    cached = sum(max(o.num_cached_tokens for o in g) for g in groups)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _error_event(out: RequestOutput) -> bytes:
    return sse_event(error_body(out.error or "generation failed", "internal_error"))


@dataclass(frozen=True, slots=True)
class OpenAIAnswer:
    """One OpenAI request's answer: what each response or chunk repeats, and what it includes.
    `n`: choices per prompt (usage counts a prompt once for its n choices)."""
    id: str
    created: int
    model: str
    n: int
    logprobs: bool
    include_usage: bool
    token_strings: TokenStrings
    token_bytes: Callable | None = None  # exact bytes where the tokenizer knows them

    def completion(self, outputs: list[list[RequestOutput]]) -> CompletionResponse:
        choices = [CompletionChoice(
            index=i, text="".join(o.new_text for o in outs), finish_reason=outs[-1].finish_reason,
            logprobs=completion_logprobs(logprob_entries(outs), self.token_strings) if self.logprobs else None)
            for i, outs in enumerate(outputs)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=usage(outputs, self.n))

    async def completion_stream(self, events: ChoiceEvents, num_choices: int) -> AsyncIterator[bytes]:
        offsets = [0] * num_choices
        by_choice: list[list[RequestOutput]] = [[] for _ in range(num_choices)]
        async for i, out in events:
            by_choice[i].append(out)
            lp = None
            if self.logprobs:
                lp = completion_logprobs(out.logprobs or [], self.token_strings, offsets[i])
                if lp.tokens:
                    offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
            choice = CompletionChoice(index=i, text=out.new_text, logprobs=lp, finish_reason=out.finish_reason)
            yield sse_event(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice]))
            if out.finish_reason == "error":
                yield _error_event(out)
        if self.include_usage:
            yield sse_event(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[],
                                               usage=usage(by_choice, self.n)))
        yield SSE_DONE

    def chat(self, outputs: list[list[RequestOutput]]) -> ChatCompletionResponse:
        choices = [ChatChoice(
            index=i, message=AssistantMessage(content="".join(o.new_text for o in outs)),
            finish_reason=outs[-1].finish_reason,
            logprobs=chat_logprobs(logprob_entries(outs), self.token_strings, self.token_bytes)
            if self.logprobs else None)
            for i, outs in enumerate(outputs)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage(outputs, self.n))

    def _chunk(self, choices: list[ChatChunkChoice], usage_: Usage | None = None) -> bytes:
        return sse_event(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                             usage=usage_))

    async def chat_stream(self, events: ChoiceEvents, num_choices: int) -> AsyncIterator[bytes]:
        by_choice: list[list[RequestOutput]] = [[] for _ in range(num_choices)]
        for i in range(num_choices):
            yield self._chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for i, out in events:
            by_choice[i].append(out)
            lp = chat_logprobs(out.logprobs or [], self.token_strings, self.token_bytes) if self.logprobs else None
            yield self._chunk([ChatChunkChoice(index=i, delta=Delta(content=out.new_text), logprobs=lp,
                                               finish_reason=out.finish_reason)])
            if out.finish_reason == "error":
                yield _error_event(out)
        if self.include_usage:
            yield self._chunk([], usage(by_choice, self.n))
        yield SSE_DONE


@dataclass(frozen=True, slots=True)
class GenerateAnswer:
    """One `/generate` answer: `prefix` (the prompt, for return_full_text) starts the whole text;
    `details` adds token ids, per-token text and logprobs, counts and timings."""
    prefix: str
    details: bool
    seed: int | None
    token_strings: TokenStrings

    def details_of(self, outs: list[RequestOutput]) -> GenerateDetails:
        last = outs[-1]
        token_ids = [t for o in outs for t in o.new_token_ids]
        lps = {i: e.logprob for i, e in enumerate(logprob_entries(outs))}
        tokens = [GeneratedToken(id=t, text=s, logprob=lps.get(i))
                  for i, (t, s) in enumerate(zip(token_ids, self.token_strings(token_ids)))]
        return GenerateDetails(
            finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
            generated_tokens=last.completion_tokens, cached_tokens=last.num_cached_tokens, seed=self.seed,
            token_ids=token_ids, tokens=tokens, timings=Timings(
                queue_time_s=None if last.first_scheduled_time is None else last.first_scheduled_time - last.arrival_time,
                ttft_s=None if last.first_token_time is None else last.first_token_time - last.arrival_time,
                e2e_s=last.time - last.arrival_time))

    def response(self, outs: list[RequestOutput]) -> GenerateResponse:
        text = self.prefix + "".join(o.new_text for o in outs)
        return GenerateResponse(generated_text=text, details=self.details_of(outs) if self.details else None)

    async def stream(self, events: ChoiceEvents) -> AsyncIterator[bytes]:
        outs: list[RequestOutput] = []
        async for _, out in events:
            outs.append(out)
            last = out.finished
            yield sse_event(GenerateStreamEvent(
                text=out.new_text, token_ids=out.new_token_ids, finish_reason=out.finish_reason,
                generated_text=self.prefix + "".join(o.new_text for o in outs) if last else None,
                details=self.details_of(outs) if last and self.details else None))
            if out.finish_reason == "error":
                yield _error_event(out)
        yield SSE_DONE
