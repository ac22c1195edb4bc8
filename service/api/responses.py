"""The answers of the generation endpoints, built from engine outputs: JSON bodies and SSE streams.

For OpenAI's completions and chat completions (OpenAIAnswer) and TGI's `/generate`,
`/generate_stream` and `POST /` (GenerateAnswer): a whole response from every output of every
choice, and a stream of ready-framed server-sent events from (choice index, output) pairs as they
arrive. A choice that fails mid-stream is followed by an error event. No FastAPI here.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.api.echo import Echo
from service.api.protocol import SSE_DONE, error_body, sse_event
from service.api.protocol_logprobs import chat_logprobs, clamp_logprob, completion_logprobs
from service.api.protocol_native import Details, GenerateResponse, StreamDetails, StreamResponse, TGIError, Token
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
from service.api.tool_stream import ToolAnswer
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
    system_fingerprint: str | None = None
    continuous_usage: bool = False       # usage so far on every chunk (vLLM's continuous_usage_stats)
    echo: Echo | None = None             # completions: the prompt shown before the completion
    tools: ToolAnswer | None = None      # chat with tools: calls out of the text (service.api.tool_stream)

    def _completion_choice(self, i: int, outs: list[RequestOutput], first: RequestOutput | None) -> CompletionChoice:
        """Choice i of these outputs; `first`: the choice's first output, when `outs` include it."""
        text = "".join(o.new_text for o in outs)
        lp = completion_logprobs(logprob_entries(outs), self.token_strings) if self.logprobs else None
        finish = outs[-1].finish_reason
        echo = self.echo
        if echo is None:
            return CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)
        entries = first.prompt_logprobs if first is not None else None
        return CompletionChoice(index=i, text=echo.text(i, text) if first is not None else "" if echo.prompt_only
                                else text, logprobs=echo.logprobs_of(i, entries, lp), finish_reason=finish,
                                prompt_logprobs=echo.vllm(entries))

    def completion(self, outputs: list[list[RequestOutput]]) -> CompletionResponse:
        choices = [self._completion_choice(i, outs, outs[0]) for i, outs in enumerate(outputs)]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self._completion_usage(outputs), system_fingerprint=self.system_fingerprint)

    def _completion_usage(self, outputs: list[list[RequestOutput]]) -> Usage:
        total = usage(outputs, self.n)
        if self.echo is not None and self.echo.prompt_only:  # the sampled token is not shown: not counted
            total.completion_tokens, total.total_tokens = 0, total.prompt_tokens
        return total

    async def completion_stream(self, events: ChoiceEvents, num_choices: int) -> AsyncIterator[bytes]:
        offsets = [0] * num_choices
        by_choice: list[list[RequestOutput]] = [[] for _ in range(num_choices)]
        async for i, out in events:
            first = out if not by_choice[i] else None
            by_choice[i].append(out)
            choice = self._completion_choice(i, [out], first)
            lp = choice.logprobs
            if lp is not None:
                lp.text_offset = [offsets[i] + o for o in lp.text_offset]
                if lp.tokens:
                    offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
            yield sse_event(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice],
                                               usage=self._running_usage(by_choice),
                                               system_fingerprint=self.system_fingerprint))
            if out.finish_reason == "error":
                yield _error_event(out)
        if self.include_usage:
            yield sse_event(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[],
                                               usage=self._completion_usage(by_choice),
                                               system_fingerprint=self.system_fingerprint))
        yield SSE_DONE

    def _message(self, outs: list[RequestOutput]) -> tuple[AssistantMessage, str | None]:
        text, finish = "".join(o.new_text for o in outs), outs[-1].finish_reason
        if self.tools is None:
            return AssistantMessage(content=text), finish
        content, calls = self.tools.message(text)
        return AssistantMessage(content=content, tool_calls=calls), "tool_calls" if calls and finish == "stop" else finish

    def chat(self, outputs: list[list[RequestOutput]]) -> ChatCompletionResponse:
        choices = [ChatChoice(
            index=i, message=message, finish_reason=finish,
            logprobs=chat_logprobs(logprob_entries(outs), self.token_strings, self.token_bytes)
            if self.logprobs else None)
            for i, outs in enumerate(outputs) for message, finish in [self._message(outs)]]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage(outputs, self.n), system_fingerprint=self.system_fingerprint)

    def _running_usage(self, by_choice: list[list[RequestOutput]]) -> Usage | None:
        """With continuous_usage_stats: the usage so far (choices not yet started count nothing)."""
        if not self.continuous_usage:
            return None
        started = [outs for outs in by_choice if outs]
        prompt = sum(outs[-1].prompt_tokens for outs in started[::self.n]) if started else 0
        completion = sum(outs[-1].completion_tokens for outs in started)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _chunk(self, choices: list[ChatChunkChoice], usage_: Usage | None = None) -> bytes:
        return sse_event(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                             usage=usage_, system_fingerprint=self.system_fingerprint))

    async def chat_stream(self, events: ChoiceEvents, num_choices: int) -> AsyncIterator[bytes]:
        by_choice: list[list[RequestOutput]] = [[] for _ in range(num_choices)]
        for i in range(num_choices):
            yield self._chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        streams = [self.tools.stream() for _ in range(num_choices)] if self.tools is not None else None
        async for i, out in events:
            by_choice[i].append(out)
            lp = chat_logprobs(out.logprobs or [], self.token_strings, self.token_bytes) if self.logprobs else None
            deltas, finish = [Delta(content=out.new_text)], out.finish_reason
            if streams is not None:  # content as it is ruled out of calls, each call in its chunks, as OpenAI
                content, calls = streams[i].push(out.new_text)
                if out.finished:
                    content += streams[i].finish()
                deltas = [Delta(content=content)] if content else []
                deltas += [Delta(tool_calls=[call]) for call in calls]
                if finish == "stop" and streams[i].num_calls:
                    finish = "tool_calls"
                if not deltas and (lp is not None or finish is not None):
                    deltas = [Delta()]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                yield self._chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp if k == 0 else None,
                                                   finish_reason=finish if last else None)],
                                  self._running_usage(by_choice))
            if out.finish_reason == "error":
                yield _error_event(out)
        if self.include_usage:
            yield self._chunk([], usage(by_choice, self.n))
        yield SSE_DONE


@dataclass(frozen=True, slots=True)
class GenerateAnswer:
    """One TGI answer: `prefix` (the prompt, for return_full_text) starts generated_text; each engine
    output is one token, whose `text` is the output's new text (so the texts of the tokens add up to
    generated_text); `details` adds the tokens, counts and seed; `top_n` the top tokens."""
    prefix: str
    details: bool
    seed: int | None
    top_n: int
    input_length: int
    token_strings: TokenStrings
    special_ids: frozenset[int]
    eos_ids: frozenset[int]
    prompt_ids: list[int] | None = None            # decoder_input_details: details.prefill lists them
    decode: Callable[[list[int]], str] | None = None  # a prefill token's text (TGI decodes each alone)

    def _token(self, token_id: int, text: str, logprob: float | None) -> Token:
        return Token(id=token_id, text=text, logprob=None if logprob is None else clamp_logprob(logprob),
                     special=token_id in self.special_ids)

    def _tokens(self, out: RequestOutput) -> tuple[Token, list[Token] | None]:
        lp = out.logprobs[0] if out.logprobs else None
        token = self._token(out.new_token_ids[0], out.new_text, lp.logprob if lp else None)
        if not self.top_n or lp is None:
            return token, None
        names = self.token_strings([t for t, _ in lp.top])
        return token, [self._token(t, name, v) for (t, v), name in zip(lp.top, names)]

    def finish_reason(self, outs: list[RequestOutput]) -> str:
        """TGI's words: length, eos_token (an end token: EOS, a stop token id, a grammar's end) or stop_sequence."""
        last = outs[-1]
        if last.finish_reason != "stop":
            return last.finish_reason or "length"
        ids = [t for o in outs for t in o.new_token_ids]
        return "eos_token" if ids and ids[-1] in self.eos_ids else "stop_sequence"

    def response(self, outs: list[RequestOutput]) -> GenerateResponse:
        text = self.prefix + "".join(o.new_text for o in outs)
        if not self.details:
            return GenerateResponse(generated_text=text)
        pairs = [self._tokens(o) for o in outs if o.new_token_ids]
        details = Details(finish_reason=self.finish_reason(outs), generated_tokens=outs[-1].completion_tokens,
                          seed=self.seed, tokens=[t for t, _ in pairs],
                          top_tokens=[top or [] for _, top in pairs] if self.top_n else None,
                          prefill=self._prefill(outs[0].prompt_logprobs))
        return GenerateResponse(generated_text=text, details=details)

    def _prefill(self, entries: list | None) -> list[Token]:
        """The prompt's tokens, each with its logprob (the first has none), as TGI's details.prefill."""
        if self.prompt_ids is None or entries is None or self.decode is None:
            return []
        logprobs = [None] + [e.logprob for e in entries[1:]]
        return [self._token(t, self.decode([t]), lp) for t, lp in zip(self.prompt_ids, logprobs)]

    async def stream(self, events: ChoiceEvents) -> AsyncIterator[bytes]:
        outs: list[RequestOutput] = []
        async for _, out in events:
            outs.append(out)
            if out.finish_reason in ("error", "timeout", "abort") or not out.new_token_ids:
                kind = "generation" if out.finish_reason == "error" else "incomplete_generation"
                yield sse_event(TGIError(error=out.error or f"generation ended early: {out.finish_reason}", error_type=kind))
                continue
            token, top = self._tokens(out)
            last = out.finished
            yield sse_event(StreamResponse(
                index=len(outs), token=token, top_tokens=top,
                generated_text=self.prefix + "".join(o.new_text for o in outs) if last else None,
                details=StreamDetails(finish_reason=self.finish_reason(outs), generated_tokens=out.completion_tokens,
                                      seed=self.seed, input_length=self.input_length) if last else None))
