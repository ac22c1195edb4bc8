"""ASGI middleware around every HTTP request: its request id, its access log line, its HTTP metrics.

- Request id: the client's `X-Request-Id` (1-128 visible ASCII characters, no spaces) or a new
  one; echoed as `X-Request-Id` on every answer, logged with every record the request causes. An
  unusable one is refused with 400 before anything else runs.
- Access line (logger `kvserve.access`), when the last byte has been sent: method, path, status,
  request id, and for generation the variant, prompt / output tokens, TTFT (engine arrival to first
  token) and e2e (HTTP arrival to the end of the answer, a stream's whole length). Info level;
  successful probes, scrapes and the web page's polling (`QUIET_ROUTES`) at debug.
- Metrics: kvserve_http_requests_total{method, route, status} and the duration histogram, where
  route is the matched route template (`/v1/completions`), or "unmatched" for a path no route has:
  never the raw path, so the label set stays bounded whatever clients send.

It runs inside Starlette's error middleware: an exception escaping a handler is counted and logged
here as 500, then answered by the app's exception handler (which adds the request id from the scope).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from service.api.protocol import error_body
from service.api.request_context import RequestRecord, current_record
from service.logs import current_request_id

log = logging.getLogger("kvserve.access")
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
QUIET_ROUTES = frozenset({"/health", "/metrics", "/stats"})
UNMATCHED_ROUTE = "unmatched"


def request_id_of(scope) -> str | None:
    """The request id the middleware gave this request (for handlers outside it, e.g. the 500 one)."""
    return scope.get("state", {}).get("request_id")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = given if given is not None and _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        status = 0

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        record = RequestRecord(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        tokens = current_record.set(record), current_request_id.set(request_id)
        try:
            if given is not None and request_id != given:
                await self._refuse_request_id(given, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # the error middleware outside answers it
            raise
        finally:
            current_record.reset(tokens[0])
            current_request_id.reset(tokens[1])
            self._done(scope, record, status or 499, time.perf_counter() - started)

    async def _refuse_request_id(self, given: str, send) -> None:
        shown = given if len(given) <= 40 else given[:40] + "..."
        body = error_body(f"X-Request-Id {shown!r} is not usable: it must be 1-128 visible ASCII characters "
                          f"(no spaces), got {len(given)} characters", "invalid_request_error",
                          "X-Request-Id").model_dump()
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _done(self, scope, record: RequestRecord, status: int, e2e_s: float) -> None:
        route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
        method = scope.get("method", "")
        self.metrics.http_request(method, route, status, e2e_s)
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        if not log.isEnabledFor(level):
            return
        fields = {"method": method, "path": scope.get("path", ""), "route": route, "status": status,
                  "request_id": record.request_id, "variant": record.variant,
                  "prompt_tokens": record.prompt_tokens, "output_tokens": record.output_tokens,
                  "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 4), "e2e_s": round(e2e_s, 4)}
        client = scope.get("client")
        if client:
            fields["client"] = client[0]
        fields = {k: v for k, v in fields.items() if v is not None}
        text = " ".join(f"{k}={fields[k]}" for k in ("request_id", "variant", "prompt_tokens", "output_tokens")
                        if k in fields)
        ttft = f" ttft={fields['ttft_s']:.3f}s" if "ttft_s" in fields else ""
        log.log(level, "%s %s %d %s%s e2e=%.3fs", method, fields["path"], status, text, ttft, e2e_s, extra=fields)
