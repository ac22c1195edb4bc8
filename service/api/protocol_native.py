"""The native bodies: TGI-like `/generate` (request, response, stream event) and `/tokenize` / `/detokenize`.

`/generate` is greedy unless sampling is asked for, as in TGI; its errors name fields as
`parameters.<name>`. `/tokenize` takes a prompt or OpenAI chat messages. No FastAPI here.
"""
from __future__ import annotations

from pydantic import BaseModel, field_validator

from model.sampling_params import SamplingParams
from service.api.limits import check_cache_salt, check_seed
from service.api.protocol import RequestBody, sampling_params
from service.api.protocol_openai import ChatMessage
from service.engine.errors import RequestError

# SamplingParams field -> its name in a /generate body (what errors name)
GENERATE_NAMES = {f: f"parameters.{f}" for f in SamplingParams.__dataclass_fields__} | {
    "max_tokens": "parameters.max_new_tokens", "logprobs": "parameters.top_n_tokens"}


class GenerateParameters(RequestBody):
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


class GenerateRequest(RequestBody):
    """TGI's shape: `inputs` (or `prompt`: text or token ids), `parameters`, `stream`."""
    inputs: str | None = None
    prompt: str | list[int] | None = None
    parameters: GenerateParameters = GenerateParameters()
    stream: bool = False
    model: str | None = None
    cache_salt: str | None = None  # as in the OpenAI routes: prefix-cache blocks shared only under equal salts

    @field_validator("cache_salt")
    @classmethod
    def _salt_size(cls, v):
        return check_cache_salt(v)

    def prompt_input(self) -> str | list[int]:
        if self.inputs is not None and self.prompt is None:
            return self.inputs
        if self.prompt is not None and self.inputs is None:
            return self.prompt
        raise RequestError("give exactly one of inputs or prompt", "inputs")

    def to_sampling_params(self) -> SamplingParams:
        p = self.parameters
        # TGI: greedy unless sampling is asked for (do_sample or an explicit temperature)
        temperature = p.temperature if p.temperature is not None else (1.0 if p.do_sample else 0.0)
        names = GENERATE_NAMES
        check_seed(p.seed, 1, names["seed"])
        return sampling_params(
            names, max_tokens=64 if p.max_new_tokens is None else p.max_new_tokens, temperature=temperature,
            top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, seed=p.seed,
            stop=tuple(p.stop or ()), stop_token_ids=tuple(p.stop_token_ids or ()), ignore_eos=p.ignore_eos,
            logprobs=p.top_n_tokens,
        )


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


# ---- responses ----

class GeneratedToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Timings(BaseModel):
    queue_time_s: float | None  # arrival -> first scheduled
    ttft_s: float | None        # arrival -> first token
    e2e_s: float                # arrival -> finished


class GenerateDetails(BaseModel):
    finish_reason: str | None
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
