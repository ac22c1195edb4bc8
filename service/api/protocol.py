"""What every HTTP body of the API shares: strict parsing, SamplingParams errors, the error body, SSE.

The endpoint bodies live beside this file: protocol_openai (completions, chat, models),
protocol_native (`/generate`, `/tokenize`, `/detokenize`) and protocol_logprobs (logprobs in
OpenAI's two shapes). Requests parse strictly (a string is not an int); every malformed body is a
400, as OpenAI and vLLM answer (the openai client raises BadRequestError). Unknown fields are kept
aside (`unknown_fields`): the pipeline logs them once per request, as vLLM does, or refuses them
under --reject-unknown-fields. Range checks come from the one table in service.api.limits,
applied in `sampling_params` before a SamplingParams exists; a RequestError names the field as the
client spelled it. No FastAPI here.
"""
from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, ValidationError

from model.sampling_params import SamplingParams
from service.api.limits import check_fields
from service.engine.errors import RequestError


class RequestBody(BaseModel):
    """Base of every request body: strict types, unknown fields kept aside (see unknown_fields)."""
    model_config = ConfigDict(strict=True, extra="allow")


def unknown_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of every field the body's models do not declare (nested bodies included)."""
    names = [prefix + key for key in (body.model_extra or {})]
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                where = f"{prefix}{name}." if not isinstance(value, list) else f"{prefix}{name}.{i}."
                names += unknown_fields(item, where)
    return names


class InvalidBody(ValueError):
    """The body is not JSON, has a wrong type or shape, or a bad value: a 400 naming the field."""

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
        raise InvalidBody(msg, param, 400) from None


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\-]")


def _field_path(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages.0.content', dropping pydantic's union-member tags."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not _UNION_TAG.search(str(p)))


def sampling_params(names: dict[str, str] | None = None, **kwargs) -> SamplingParams:
    """SamplingParams once every field is within service.api.limits' table; RequestError naming the
    field as the API spells it (`names`: engine field -> API name) otherwise."""
    check_fields(kwargs, names)
    try:
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    except ValueError as exc:
        msg = str(exc)  # "<field>=<value> is out of range: ..." or "stop strings must not be empty"
        m = re.match(r"(\w+)=", msg)
        field = m.group(1) if m else ("stop" if msg.startswith("stop") else None)
        api_name = (names or {}).get(field, field) if field else None
        if field and api_name != field:
            msg = msg.replace(f"{field}=", f"{api_name}=", 1)
        raise RequestError(msg, api_name) from None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict) -> bytes:
    """One server-sent event: `data: {json}` and a blank line (JSON never holds a raw newline)."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + body.encode() + b"\n\n"
