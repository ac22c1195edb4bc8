"""OpenAI's bodies: completions and chat completions (requests, responses, stream chunks, usage), models.

Requests parse strictly and convert to SamplingParams (see service.api.protocol); `n` choices of one
request each get their own seed. Logprob shapes are in service.api.protocol_logprobs. No FastAPI here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator, model_serializer

from model.sampling_params import SamplingParams, StructuredOutput
from service.api.limits import MAX_CHOICES, MAX_N, check_cache_salt, check_choices, check_seed
from service.api.protocol import RequestBody, sampling_params
from service.api.protocol_logprobs import ChatLogprobs, CompletionLogprobs, PromptLogprob
from service.api.protocol_sglang import RouterFields
from service.api.protocol_structured import StructuredFields
from service.api.protocol_tools import ToolCall, ToolCallDelta, ToolCallIn, ToolFields
from service.engine.errors import RequestError

__all__ = ["MAX_CHOICES", "MAX_N"]  # the limits, where the bodies that obey them live


def _stop_tuple(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _check_n(n: int) -> int:
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n={n} is out of range: must be in [1, {MAX_N}]")
    return n


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far on every chunk


class _SamplingFields(StructuredFields, RouterFields):
    """The sampling knobs both OpenAI endpoints share (vLLM's extensions, structured output and the
    fields the routers add included)."""
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
    min_tokens: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    cache_salt: str | None = None       # vLLM's: requests share prefix-cache blocks only under equal salts

    @field_validator("cache_salt")
    @classmethod
    def _salt_size(cls, v):
        return check_cache_salt(v)

    @field_validator("n")
    @classmethod
    def _n_in_range(cls, v):
        return _check_n(v)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported: only an empty object (or omit it)")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def _params(self, max_tokens: int, logprobs: int | None, names: dict[str, str], seed_offset: int,
                prompt_logprobs: int | None = None, structured: StructuredOutput | None = None) -> SamplingParams:
        check_seed(self.seed, self.n)
        self.check_router_fields()
        asked, param = self.structured_output()
        if structured is not None and asked is not None:
            raise RequestError(f"{param} cannot be combined with tool_choice required or a named function (their "
                               "grammar is the tool call's)", param)
        structured = structured or asked
        return sampling_params(
            names, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            # each choice its own reproducible stream: the same seed must not give n identical texts
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=_stop_tuple(self.stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, min_tokens=self.min_tokens, structured_output=structured,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False                  # the prompt before the completion (with logprobs: the prompt's too)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and its top-k, beside the choice
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

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, v):
        if v:
            raise ValueError("suffix is not supported: only null or an empty string")
        return v

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) alone, nothing generated."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids (RequestError past MAX_CHOICES engine requests)."""
        v = self.prompt
        prompts = [v] if isinstance(v, str) or isinstance(v[0], int) else list(v)
        check_choices(len(prompts), self.n)
        return prompts

    def to_sampling_params(self, choice: int = 0) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of={self.best_of} is not supported: only best_of == n", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens=0 is out of range: it must be >= 1 (0 only with echo=true)", "max_tokens")
        # prompt only: the engine samples one token, which the answer leaves out
        max_tokens = 16 if self.max_tokens is None else 1 if self.prompt_only else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if self.prompt_logprobs is not None:
            prompt_logprobs = max(self.prompt_logprobs, prompt_logprobs or 0)
        return self._params(max_tokens, self.logprobs, {}, choice, prompt_logprobs)


class TextPart(RequestBody):
    type: str
    text: str | None = None


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None              # a tool message: the call it answers

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            for part in v:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"content part of type {part.type!r} is not supported: only text")
        return v

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        # the templates of small open models know "system" only
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:  # the participant's name, for templates that show it (as vLLM passes it)
            message["name"] = self.name
        if self.tool_calls:  # rendered by service.api.tool_calls.template_messages
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields, ToolFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    documents: list[dict[str, Any]] | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("must hold at least one message")
        return v

    @field_validator("chat_template")
    @classmethod
    def _no_request_template(cls, v):
        if v is not None:
            raise ValueError("chat_template per request is not accepted (templates run code): start the server "
                             "with --chat-template FILE instead")
        return v

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]

    def template_variables(self) -> dict[str, Any]:
        """Extra chat-template variables: chat_template_kwargs, and documents (RAG templates read them)."""
        variables = dict(self.chat_template_kwargs or {})
        reserved = {"messages", "add_generation_prompt", "tools"} & set(variables)
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}: use the request's own "
                               "fields", "chat_template_kwargs")
        if self.documents is not None:
            variables["documents"] = self.documents
        return variables

    def check_continuation(self) -> None:
        """continue_final_message: the last message is the assistant's, extended, with no new turn."""
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise RequestError("continue_final_message=true needs add_generation_prompt=false", "continue_final_message")
            if self.messages[-1].role != "assistant":
                raise RequestError("continue_final_message=true needs the last message to be the assistant's "
                                   f"(it is {self.messages[-1].role!r})", "continue_final_message")

    def to_sampling_params(self, room: int, choice: int = 0, tool_grammar: StructuredOutput | None = None) -> SamplingParams:
        """`room`: tokens left in the context after the prompt, the default max_tokens as in OpenAI;
        `tool_grammar`: the grammar tool_choice asks for (service.api.tool_calls)."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max(room, 1) if max_tokens is None else max_tokens, logprobs,
                            {"max_tokens": name, "logprobs": "top_logprobs"}, choice, structured=tool_grammar)


# ---- responses ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's, when asked for

    @model_serializer(mode="wrap")
    def _prompt_logprobs_when_asked(self, handler):
        data = handler(self)
        if data.get("prompt_logprobs") is None:
            data.pop("prompt_logprobs", None)
        return data


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler):  # OpenAI sends tool_calls only when there are calls
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


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
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

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
    system_fingerprint: str | None = None


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
