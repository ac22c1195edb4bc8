"""The HTTP app: `create_app(state)` builds the FastAPI application of one server.

Routes live in service.api.routes and share one request pipeline (service.api.pipeline). Here:
how every error becomes an answer. An APIError carries its status and OpenAI error body (and is
counted in kvserve_requests_rejected_total when it has a reason); on TGI's routes (`/generate`,
`/generate_stream`, `POST /`) the body is TGI's instead, `{"error", "error_type"}`, which
huggingface_hub turns into its ValidationError / OverloadedError. Starlette's own 404 / 405 get the
OpenAI body; a client that left gets nothing (499 in logs); anything else is a 500 with a one-line
message, never a traceback. HEAD is answered wherever GET is (service.api.head); a path with a
trailing slash is a 404, never a redirect. CORS, when --allowed-origins names origins, is Starlette's middleware
(it answers preflight OPTIONS itself, before the API key check). The only package that imports
FastAPI is this one (service.api).
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

from service.api.disconnect import ClientGone
from service.api.errors import APIError
from service.api.head import HeadAsGet
from service.api.middleware import RequestContextMiddleware, request_id_of
from service.api.pipeline import Pipeline
from service.api.protocol import error_body
from service.api.protocol_native import TGIError
from service.api.routes import register_routes
from service.api.routes_responses import register_responses_routes
from service.api.state import ServerState
from service.api.ui import add_ui_routes


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(message, type_, param, code).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


TGI_ROUTES = frozenset({"/generate", "/generate_stream", "/"})


def _tgi_error_type(status: int) -> str:
    return "overloaded" if status in (429, 503) else "validation" if status < 500 else "generation"


def create_app(state: ServerState) -> FastAPI:
    # no redirect to the slash-less path: Starlette builds its Location from the Host header, before
    # any route (so before the API key check); `/v1/completions/` is a 404 instead
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.add_middleware(HeadAsGet)  # innermost: the access line and metrics still say HEAD
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)  # request id, access line, HTTP metrics
    if state.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(state.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        if exc.reason:
            state.metrics.rejected(exc.variant or state.default_variant, exc.reason)
        if request.method == "POST" and request.url.path in TGI_ROUTES:  # TGI's messages start with the field
            message = exc.message if exc.param is None or exc.message.startswith(exc.param) else f"{exc.param}: {exc.message}"
            body = TGIError(error=message, error_type=_tgi_error_type(exc.status)).model_dump()
            return JSONResponse(body, status_code=exc.status, headers=exc.headers)
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_response(exc.status_code, message, "not_found_error" if exc.status_code == 404
                               else "invalid_request_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        rid = request_id_of(request.scope)  # answered outside the middleware, which cannot add it here
        return _error_response(500, f"internal server error: {type(exc).__name__}", "internal_error",
                               headers={"X-Request-Id": rid} if rid else None)

    pipe = Pipeline(state)
    register_routes(app, pipe)
    register_responses_routes(app, pipe)
    add_ui_routes(app, state)  # the web page at / and its /stats
    return app
