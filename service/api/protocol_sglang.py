"""What the cache-aware routers put in bodies: SGLang's fields on the OpenAI routes, and SGLang's
own `/generate` request and response.

sglang-router (and vllm-router, its fork) re-serialise every OpenAI body from SGLang's request
types, so each body arrives with SGLang's extra fields at their defaults. `RouterFields` declares
them, so none is logged as an unknown field, and checks them: a field kvserve honours may take any
value, one it cannot honour is accepted only at its documented default (what kvserve does anyway)
and is otherwise a 400 naming the field and the value it allows. Reasoning fields
(`separate_reasoning`, `stream_reasoning`, `include_reasoning`) take any value: without a reasoning
parser there is no reasoning text to separate, stream or drop, exactly as in SGLang and vLLM. A
chat body without `model` arrives as `"model": "unknown"`, sglang-router's placeholder for "none
given": it means the default model here, as a missing `model` does.

SGLang's `/generate` (`{"text" | "input_ids", "sampling_params", "stream", ...}`, which
sglang-router and vllm-router post to `/generate`) is told apart from TGI's (`{"inputs",
"parameters"}`) by its fields (`is_sglang_generate`). No FastAPI here.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, field_validator, model_serializer

from model.sampling_params import SamplingParams, StructuredOutput
from service.api.limits import check_seed
from service.api.protocol import RequestBody, sampling_params
from service.api.protocol_structured import json_spec
from service.engine.errors import RequestError

ROUTER_NO_MODEL = "unknown"  # sglang-router's `model` for a request that named none
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # as SGLang


def _refuse_non_defaults(body: BaseModel, defaults: dict[str, Any], prefix: str = "") -> None:
    """RequestError for the first field set to anything but the default kvserve does anyway."""
    for name, (default, why) in defaults.items():
        value = getattr(body, name)
        if value is not None and value != default:
            raise RequestError(f"{prefix}{name}={json.dumps(value)} is not supported: only {json.dumps(default)} ({why})",
                               prefix + name)


_FIXED = {
    "no_stop_trim": (False, "a matched stop string is always trimmed from the text"),
    "skip_special_tokens": (True, "special tokens are never part of the text"),
    "return_hidden_states": (False, "hidden states are not returned"),
}


class RouterFields(RequestBody):
    """SGLang's fields on OpenAI bodies (mixed into both OpenAI request bodies)."""
    no_stop_trim: bool | None = None
    skip_special_tokens: bool | None = None
    return_hidden_states: bool | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    include_reasoning: bool | None = None  # vLLM's name for the same

    @field_validator("model", check_fields=False)
    @classmethod
    def _router_placeholder(cls, v):
        return None if v == ROUTER_NO_MODEL else v

    def check_router_fields(self) -> None:
        _refuse_non_defaults(self, _FIXED)


def is_sglang_generate(raw: dict[str, Any]) -> bool:
    """SGLang's `/generate` shape rather than TGI's: `text` or `input_ids`, or `sampling_params`."""
    return "inputs" not in raw and any(k in raw for k in ("text", "input_ids", "sampling_params"))


class SGLangSamplingParams(RequestBody):
    """SGLang's `sampling_params` (SGLang's defaults: max_new_tokens 128, temperature 1.0)."""
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    n: int | None = None
    no_stop_trim: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None

    def structured_output(self) -> StructuredOutput | None:
        given = [(k, v) for k, v in (("json_schema", self.json_schema), ("regex", self.regex), ("ebnf", self.ebnf))
                 if v is not None]
        if len(given) > 1:
            raise RequestError(f"sampling_params: give at most one of json_schema, regex, ebnf (got "
                               f"{', '.join(k for k, _ in given)})", f"sampling_params.{given[1][0]}")
        if not given:
            return None
        kind, value = given[0]
        if kind == "json_schema":
            return json_spec(value, "sampling_params.json_schema")
        return StructuredOutput("regex" if kind == "regex" else "grammar", value)


_GENERATE_FIXED = {
    "return_logprob": (False, "use /v1/completions with logprobs"),
    "return_hidden_states": (False, "hidden states are not returned"),
    "return_text_in_logprobs": (False, "logprobs are not returned here"),
    "log_metrics": (True, "every request is counted in /metrics"),
    "background": (False, "requests run in the foreground"),
    "no_logs": (False, "every request is logged"),
    "return_bytes": (False, "text is returned as text"),
    "return_entropy": (False, "entropy is not computed"),
    "lora_path": (None, "no LoRA adapters are loaded"),
}
_SAMPLING_FIXED = {
    "n": (1, "one sequence per request; use /v1/completions with n"),
    "no_stop_trim": (False, "a matched stop string is always trimmed from the text"),
    "skip_special_tokens": (True, "special tokens are never part of the text"),
    "spaces_between_special_tokens": (True, "special tokens are never part of the text"),
}
# SamplingParams field -> its name in an SGLang body (what errors name)
SGLANG_NAMES = {f: f"sampling_params.{f}" for f in SamplingParams.__dataclass_fields__} | {
    "max_tokens": "sampling_params.max_new_tokens", "min_tokens": "sampling_params.min_new_tokens",
    "seed": "sampling_params.sampling_seed", "prompt": "text"}


class SGLangGenerateRequest(RequestBody):
    """SGLang's `/generate` body for one prompt: `text` or `input_ids`."""
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SGLangSamplingParams = SGLangSamplingParams()
    stream: bool = False
    model: str | None = None
    rid: str | None = None
    return_logprob: bool | None = None
    return_hidden_states: bool | None = None
    return_text_in_logprobs: bool | None = None
    log_metrics: bool | None = None
    background: bool | None = None
    no_logs: bool | None = None
    return_bytes: bool | None = None
    return_entropy: bool | None = None
    lora_path: str | None = None

    @field_validator("text", mode="before")
    @classmethod
    def _one_text(cls, v):
        if isinstance(v, list):
            raise ValueError("a batch of texts is not supported: send one text per request")
        return v

    def prompt(self) -> str | list[int]:
        if (self.text is None) == (self.input_ids is None):
            raise RequestError("give exactly one of text or input_ids", "text")
        if self.input_ids is not None and not self.input_ids:
            raise RequestError("input_ids must not be empty", "input_ids")
        return self.text if self.text is not None else self.input_ids  # type: ignore[return-value]

    def to_sampling_params(self) -> SamplingParams:
        _refuse_non_defaults(self, _GENERATE_FIXED)
        p = self.sampling_params
        _refuse_non_defaults(p, _SAMPLING_FIXED, "sampling_params.")
        if p.logit_bias:
            raise RequestError("sampling_params.logit_bias is not supported: only an empty object",
                               "sampling_params.logit_bias")
        check_seed(p.sampling_seed, 1, "sampling_params.sampling_seed")
        stop = (p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ())
        return sampling_params(
            SGLANG_NAMES, max_tokens=SGLANG_DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens,
            min_tokens=p.min_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
            frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
            repetition_penalty=p.repetition_penalty, seed=p.sampling_seed, stop=stop,
            stop_token_ids=tuple(p.stop_token_ids or ()), ignore_eos=p.ignore_eos,
            structured_output=p.structured_output())


class FinishReason(BaseModel):
    type: str                           # stop | length | abort
    matched: int | str | None = None    # the stop token id or stop string that ended it
    length: int | None = None           # the max_new_tokens reached
    message: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # SGLang sends {"type": "length", "length": 16}, no nulls
        return {k: v for k, v in handler(self).items() if v is not None}


class MetaInfo(BaseModel):
    id: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float


class SGLangGenerateResponse(BaseModel):
    """One answer, or one stream event (text and output_ids so far, as SGLang streams them)."""
    text: str
    output_ids: list[int]
    meta_info: MetaInfo

