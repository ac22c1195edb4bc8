"""The API's error answers as exceptions: APIError, and the ones every generation endpoint raises.

Anything below a route handler raises an APIError; service.api.app answers it with OpenAI's error body,
its status and headers, and counts it in kvserve_requests_rejected_total when it has a `reason`.
No FastAPI here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from service.engine import ContextLengthError, RequestError, RequestOutput


class APIError(Exception):
    """An error answer in OpenAI's shape; `reason` counts it in kvserve_requests_rejected_total."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, reason: str | None = None, variant: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.reason, self.variant, self.headers = reason, variant, headers


def unavailable(message: str, code: str, reason: str | None, variant: str | None = None,
                retry_after_s: float = 1.0) -> APIError:
    """503 with Retry-After: the server cannot take the request now, but may soon."""
    return APIError(503, message, "service_unavailable_error", code=code, reason=reason, variant=variant,
                    headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def bad_request(exc: RequestError, variant: str, names: Mapping[str, str]) -> APIError:
    """400 for what the engine or SamplingParams refused, under the field's name in this endpoint."""
    param = names.get(exc.param, exc.param) if exc.param is not None else None
    too_long = isinstance(exc, ContextLengthError)
    message = str(exc) if param == exc.param else f"{param}: {exc}"
    if too_long:  # starts as OpenAI's does, and names its code in the text too: clients match on either
        message = f"{exc} (param: {param}; code: context_length_exceeded)"
    return APIError(400, message, param=param, code="context_length_exceeded" if too_long else None,
                    reason="too_long" if too_long else "invalid", variant=variant)


def failed(outputs: list[RequestOutput]) -> APIError | None:
    """The error to answer instead of a result: an engine error, or a timeout before any token."""
    for out in outputs:
        if out.finish_reason == "error":
            return APIError(500, out.error or "internal error during generation", "internal_error", code="engine_error")
        if out.finish_reason == "timeout" and out.completion_tokens == 0:
            # it waited this long without a token: retrying sooner only lengthens the queue it waited in
            return unavailable(out.error or "request timed out before its first token", "timeout", None,
                               retry_after_s=out.time - out.arrival_time)
    return None
