"""The HTTP API's bodies: pydantic models for requests and responses, and their conversions.

Covers OpenAI's completions and chat completions (requests, responses, stream chunks, usage,
logprobs in both shapes), the native TGI-like `/generate`, `/tokenize` / `/detokenize`, the OpenAI
error body, and the SSE framing. Requests parse strictly (a string is not an int); unknown fields
are ignored so newer clients keep working. Range checks live in SamplingParams: its ValueError
becomes a RequestError naming the field as the client spelled it. No FastAPI here.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_serializer

from model.sampling_params import SamplingParams
from service.errors import RequestError

MAX_N = 16          # choices per request
MAX_CHOICES = 128   # prompts x n of one completions request
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens like this


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class InvalidBody(ValueError):
    """The body is not JSON (400), has a wrong type or shape (422) or a bad value (400)."""

    def __init__(self, message: str, param: str | None, status: int):
        super().__init__(message)
        self.param = param
        self.status = status


def parse_body(cls: type[BaseModel], raw: bytes):
    """`cls` from a JSON body, or InvalidBody with one line naming the first bad field."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise InvalidBody(f"malformed JSON body: {err['msg']}", None, 400) from None
        param = _field_path(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "model_type" and not param:
            msg = "the body must be a JSON object"
        elif param and not msg.startswith(param.rsplit(".", 1)[-1]):
            msg = f"{param}: {msg}"
        raise InvalidBody(msg, param, 400 if err["type"] == "value_error" else 422) from None


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\-]")


def _field_path(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages.0.content', dropping pydantic's union-member tags."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not _UNION_TAG.search(str(p)))


def sampling_params(names: dict[str, str] | None = None, **kwargs) -> SamplingParams:
    """SamplingParams, its range errors as RequestError naming the field as the API spells it."""
    try:
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as exc:
        msg = str(exc)  # "<field>=<value> is out of range: ..." or "stop strings must not be empty"
        m = re.match(r"(\w+)=", msg)
        field = m.group(1) if m else ("stop" if msg.startswith("stop") else None)
        api_name = (names or {}).get(field, field)
        if field and api_name != field:
            msg = msg.replace(f"{field}=", f"{api_name}=", 1)
        raise RequestError(msg, api_name) from None


def _stop_tuple(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _check_n(n: int) -> int:
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n={n} is out of range: must be in [1, {MAX_N}]")
    return n


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """The sampling knobs both OpenAI endpoints share (vLLM's extensions included)."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _n_in_range(cls, v):
        return _check_n(v)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int, logprobs: int | None, names: dict[str, str], seed_offset: int) -> SamplingParams:
        return sampling_params(
            names, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            # each choice its own reproducible stream: the same seed must not give n identical texts
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=_stop_tuple(self.stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs,
        )


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v):
        """str | list[str] | list[int] | list[list[int]], never empty."""
        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        ok = isinstance(v, str) or (isinstance(v, list) and v and (
            all(isinstance(p, str) for p in v) or is_ids(v) or all(is_ids(p) for p in v)))
        if not ok:
            raise ValueError("must be a non-empty string, list of strings, list of token ids or list of token-id lists")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids (RequestError past MAX_CHOICES engine requests)."""
        v = self.prompt
        prompts = [v] if isinstance(v, str) or isinstance(v[0], int) else list(v)
        if len(prompts) * self.n > MAX_CHOICES:
            raise RequestError(f"{len(prompts)} prompts x n={self.n} is {len(prompts) * self.n} completions; "
                               f"at most {MAX_CHOICES} per request", "prompt")
        return prompts

    def to_sampling_params(self, choice: int = 0) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of={self.best_of} is not supported: only best_of == n", "best_of")
        return self._params(16 if self.max_tokens is None else self.max_tokens, self.logprobs, {}, choice)


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            for part in v:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"content part of type {part.type!r} is not supported: only text")
        return v

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # the templates of small open models know "system" only
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("must hold at least one message")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]

    def to_sampling_params(self, room: int, choice: int = 0) -> SamplingParams:
        """`room`: tokens left in the context after the prompt, the default max_tokens as in OpenAI."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max(room, 1) if max_tokens is None else max_tokens, logprobs,
                            {"max_tokens": name, "logprobs": "top_logprobs"}, choice)


class GenerateParameters(_Request):
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    top_n_tokens: int | None = None
    details: bool = False
    return_full_text: bool = False


class GenerateRequest(_Request):
    """TGI's shape: `inputs` (or `prompt`: text or token ids), `parameters`, `stream`."""
    inputs: str | None = None
    prompt: str | list[int] | None = None
    parameters: GenerateParameters = GenerateParameters()
    stream: bool = False
    model: str | None = None

    def prompt_input(self) -> str | list[int]:
        if (self.inputs is None) == (self.prompt is None):
            raise RequestError("give exactly one of inputs or prompt", "inputs")
        return self.inputs if self.inputs is not None else self.prompt

    def to_sampling_params(self) -> SamplingParams:
        p = self.parameters
        # TGI: greedy unless sampling is asked for (do_sample or an explicit temperature)
        temperature = p.temperature if p.temperature is not None else (1.0 if p.do_sample else 0.0)
        names = {f: f"parameters.{f}" for f in SamplingParams.__dataclass_fields__}
        names |= {"max_tokens": "parameters.max_new_tokens", "logprobs": "parameters.top_n_tokens"}
        return sampling_params(
            names, max_tokens=64 if p.max_new_tokens is None else p.max_new_tokens, temperature=temperature,
            top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, seed=p.seed,
            stop=tuple(p.stop or ()), stop_token_ids=tuple(p.stop_token_ids or ()), ignore_eos=p.ignore_eos,
            logprobs=p.top_n_tokens,
        )


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses ----

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float]] | None = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # OpenAI sends {"content": "x"}, not {"role": null, ...}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GeneratedToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Timings(BaseModel):
    queue_time_s: float | None  # arrival -> first scheduled
    ttft_s: float | None        # arrival -> first token
    e2e_s: float                # arrival -> finished


class GenerateDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    seed: int | None = None
    token_ids: list[int]
    tokens: list[GeneratedToken] | None = None
    timings: Timings


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None


class GenerateStreamEvent(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    generated_text: str | None = None   # the whole text, on the last event only
    details: GenerateDetails | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- logprob shapes and SSE framing ----

def clamp_logprob(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


def completion_logprobs(entries, token_strings, start_offset: int = 0) -> CompletionLogprobs:
    """OpenAI completions shape from TokenLogprobs; `token_strings(ids)` names tokens."""
    names = token_strings([e.token_id for e in entries])
    offsets, pos = [], start_offset
    for name in names:
        offsets.append(pos)
        pos += len(name)
    tops = []
    for e in entries:
        top_names = token_strings([t for t, _ in e.top])
        tops.append({n: clamp_logprob(lp) for n, (_, lp) in zip(top_names, e.top)})
    return CompletionLogprobs(tokens=names, token_logprobs=[clamp_logprob(e.logprob) for e in entries],
                              top_logprobs=tops, text_offset=offsets)


def chat_logprobs(entries, token_strings, token_bytes=None) -> ChatLogprobs:
    """OpenAI chat shape: content = [{token, logprob, bytes, top_logprobs: [...]}]. `token_bytes(ids)`
    gives each token's raw bytes (a byte-level token may be half a character); else its string's UTF-8."""
    def items(ids, logprobs):
        names = token_strings(ids)
        raw = token_bytes(ids) if token_bytes else [n.encode() for n in names]
        return [dict(token=n, logprob=clamp_logprob(lp), bytes=list(b)) for n, lp, b in zip(names, logprobs, raw)]

    content = []
    for e in entries:
        (head,) = items([e.token_id], [e.logprob])
        top = [TopLogprob(**t) for t in items([t for t, _ in e.top], [lp for _, lp in e.top])]
        content.append(ChatTokenLogprob(**head, top_logprobs=top))
    return ChatLogprobs(content=content)


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict) -> bytes:
    """One server-sent event: `data: {json}` and a blank line (JSON never holds a raw newline)."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + body.encode() + b"\n\n"


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
