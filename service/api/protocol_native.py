"""The native bodies: Text Generation Inference's `/generate`, `/generate_stream` and `POST /`
(request, response, stream event), and `/tokenize` / `/detokenize`.

TGI's request is `{"inputs": text, "parameters": {...}, "stream": bool}`: greedy unless sampling is
asked for (do_sample, or any of temperature / top_k / top_p), `grammar` ({type: json | json_schema
| regex, value}) constrains the output; `decoder_input_details` fills details.prefill with the
prompt's tokens and logprobs (not when streaming, as in TGI); best_of > 1, watermark, typical_p and
adapter_id are refused (400 naming them). kvserve adds a few knobs TGI lacks (min_p,
presence_penalty, min_tokens, stop_token_ids, ignore_eos) and `model` for a variant; errors name
fields as `parameters.<name>`. Responses follow TGI exactly, so `huggingface_hub`'s
InferenceClient.text_generation reads them. No FastAPI here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator

from model.sampling_params import SamplingParams, StructuredOutput
from service.api.limits import check_cache_salt, check_seed
from service.api.protocol import RequestBody, sampling_params
from service.api.protocol_openai import ChatMessage
from service.api.protocol_structured import json_spec, regex_spec
from service.engine.errors import RequestError

DEFAULT_MAX_NEW_TOKENS = 100  # as TGI

# SamplingParams field -> its name in a /generate body (what errors name)
GENERATE_NAMES = {f: f"parameters.{f}" for f in SamplingParams.__dataclass_fields__} | {
    "max_tokens": "parameters.max_new_tokens", "logprobs": "parameters.top_n_tokens"}


class Grammar(RequestBody):
    type: Literal["json", "json_schema", "regex"]
    value: Any


class GenerateParameters(RequestBody):
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    truncate: int | None = None
    top_n_tokens: int | None = None
    details: bool = False
    return_full_text: bool | None = False
    grammar: Grammar | None = None
    best_of: int | None = None
    watermark: bool = False
    typical_p: float | None = None
    adapter_id: str | None = None
    decoder_input_details: bool = False
    # kvserve's, beyond TGI
    min_p: float | None = None
    presence_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def refusals(self) -> None:
        """RequestError for what TGI accepts and kvserve does not do."""
        refused = [
            ("best_of", self.best_of not in (None, 1), "only 1 (one sequence; use n on /v1/completions)"),
            ("watermark", self.watermark, "only false"),
            ("typical_p", self.typical_p not in (None, 1.0), "only 1.0 (typical sampling is not implemented)"),
            ("adapter_id", self.adapter_id is not None, "none (no LoRA adapters are loaded)"),
        ]
        for name, bad, allowed in refused:
            if bad:
                raise RequestError(f"parameters.{name}={getattr(self, name)!r} is not supported: {allowed}",
                                   f"parameters.{name}")
        if self.truncate is not None and self.truncate < 1:
            raise RequestError(f"parameters.truncate={self.truncate} is out of range: must be >= 1", "parameters.truncate")

    def structured_output(self) -> StructuredOutput | None:
        g = self.grammar
        if g is None:
            return None
        if g.type == "regex":
            if not isinstance(g.value, str):
                raise RequestError("parameters.grammar.value: a regex grammar's value must be a string",
                                   "parameters.grammar.value")
            return regex_spec(g.value, "parameters.grammar.value")
        return json_spec(g.value, "parameters.grammar.value")


class GenerateRequest(RequestBody):
    """TGI's shape: `inputs`, `parameters`, `stream` (POST / and /generate stream when it is true)."""
    inputs: str
    parameters: GenerateParameters = GenerateParameters()
    stream: bool = False
    model: str | None = None
    cache_salt: str | None = None  # as in the OpenAI routes: prefix-cache blocks shared only under equal salts

    @field_validator("cache_salt")
    @classmethod
    def _salt_size(cls, v):
        return check_cache_salt(v)

    def to_sampling_params(self) -> SamplingParams:
        p = self.parameters
        p.refusals()
        sampling = p.do_sample or p.temperature is not None or p.top_k is not None or p.top_p is not None
        temperature = (1.0 if p.temperature is None else p.temperature) if sampling else 0.0
        names = GENERATE_NAMES
        check_seed(p.seed, 1, names["seed"])
        return sampling_params(
            names, max_tokens=DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens,
            temperature=temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, seed=p.seed,
            stop=tuple(p.stop or ()), stop_token_ids=tuple(p.stop_token_ids or ()), ignore_eos=p.ignore_eos,
            logprobs=p.top_n_tokens or 0,  # every TGI token carries its logprob
            min_tokens=p.min_tokens, structured_output=p.structured_output(),
            prompt_logprobs=0 if p.decoder_input_details else None,  # details.prefill
        )


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as on chat: vllm-router sends it when it tokenizes a chat


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


# ---- responses (TGI's) ----

class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class Details(BaseModel):
    finish_reason: str                  # length | eos_token | stop_sequence
    generated_tokens: int
    seed: int | None = None
    prefill: list[Token] = []
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None   # the whole text, on the last event only
    details: StreamDetails | None = None


class TGIError(BaseModel):
    error: str
    error_type: str                     # validation | overloaded | generation | incomplete_generation


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
