"""The HTTP API: the only module that imports FastAPI.

`create_app(state)` serves OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and
`/v1/models`, the native TGI-like `/generate`, `/tokenize` / `/detokenize`, `/health` and
`/metrics`. Each generation handler: authorize, read the body (size-capped), parse it
(service.api.protocol*), pick the engine from `model`, tokenize, validate against the engine, submit
one engine request per choice (service.api.generation), then answer as JSON or as server-sent events
(service.api.responses).

A client that goes away is noticed on the ASGI receive channel (`http.disconnect`, service.api.disconnect)
both while waiting for a JSON answer and while streaming; its engine requests are aborted at once so
their KV blocks are freed. Every error a client can cause is a 4xx with OpenAI's error body.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.api.disconnect import ClientGone, unless_disconnected, wait_for_disconnect
from service.api.errors import APIError, bad_request, unavailable
from service.api.generation import check_prompts, run_to_end, submit
from service.api.middleware import RequestContextMiddleware, request_id_of
from service.api.protocol import InvalidBody, error_body, parse_body
from service.api.protocol_native import DetokenizeRequest, DetokenizeResponse, GenerateRequest, TokenizeRequest, TokenizeResponse
from service.api.protocol_openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from service.api.responses import GenerateAnswer, OpenAIAnswer
from service.api.ui import add_ui_routes
from service.engine.errors import RequestError

if TYPE_CHECKING:
    from service.api.state import ServerState
    from service.engine.engine import Engine

_MAX_DRAIN_BYTES = 64 << 20  # read past an oversized body up to this, so the client sees the 413


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = error_body(message, type_, param, code).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


class _EventStream(StreamingResponse):
    """SSE from an async iterator of ready-framed events. Watches the receive channel while it
    streams: on `http.disconnect` it stops the iterator (whose cleanup aborts the engine requests)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def stream():
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streamer = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not streamer.done():
                streamer.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            self.on_close()  # aborts whatever has not finished: the client is gone or the stream broke
            await self.body_iterator.aclose()
        if not streamer.cancelled() and streamer.exception() is not None:
            raise streamer.exception()  # a bug mid-stream: uvicorn logs it and closes the connection


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)  # request id, access line, HTTP metrics
    tokenizer = state.tokenizer

    # ---- errors ----

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.reason:
            state.metrics.rejected(exc.variant or state.default_variant, exc.reason)
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_response(exc.status_code, message, "not_found_error" if exc.status_code == 404
                               else "invalid_request_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        rid = request_id_of(request.scope)  # answered outside the middleware, which cannot add it here
        return _error_response(500, f"internal server error: {type(exc).__name__}", "internal_error",
                               headers={"X-Request-Id": rid} if rid else None)

    # ---- shared steps of every handler ----

    def admit(request: Request) -> None:
        """API key (constant-time compare), then refuse while draining."""
        if state.api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
                raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key", reason="unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})
        if state.draining:
            raise unavailable("the server is shutting down and admits no new requests", "draining", "draining")

    async def read(request: Request, cls):
        admit(request)
        length = request.headers.get("content-length", "")
        too_large = length.isdigit() and int(length) > state.max_body_bytes
        chunks, size = [], 0
        if not too_large or int(length) <= _MAX_DRAIN_BYTES:
            async for chunk in request.stream():
                size += len(chunk)
                too_large = too_large or size > state.max_body_bytes
                if not too_large:
                    chunks.append(chunk)
                elif size > _MAX_DRAIN_BYTES:
                    break
        if too_large:
            raise APIError(413, f"request body is larger than the limit of {state.max_body_bytes} bytes",
                           code="request_too_large", reason="invalid")
        try:
            return parse_body(cls, b"".join(chunks))
        except InvalidBody as exc:
            raise APIError(exc.status, str(exc), param=exc.param, reason="invalid") from None

    def route(model: str | None) -> tuple[str, Engine]:
        try:
            variant = state.route(model)
        except LookupError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found", reason="invalid") from None
        return variant, state.engines[variant]

    def token_strings(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids) if ids else []

    token_bytes = getattr(tokenizer, "token_bytes", None)  # exact bytes where the tokenizer knows them

    # ---- routes ----

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        dead = [v for v, e in state.engines.items() if not e.is_alive]
        if dead:
            return JSONResponse({"status": "unhealthy", "dead_variants": dead}, status_code=503)
        return {"status": "ok", "variants": list(state.engines)}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        admit(request)
        cards = [ModelCard(id=mid, created=state.created, root=state.model_name, max_model_len=e.max_model_len)
                 for mid, e in zip(state.model_ids(), state.engines.values())]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def openai_response(request: Request, variant: str, engine: Engine, prompts, params,
                              answer: Callable[[str], OpenAIAnswer], *, chat: bool, stream: bool):
        """Run the engine requests of one OpenAI call; answer as one JSON body or as SSE."""
        prefix = "chatcmpl" if chat else "cmpl"
        if not stream:
            outputs, rid = await run_to_end(request.receive, variant, engine, prompts, params, prefix)
            whole = answer(rid)
            return JSONResponse((whole.chat if chat else whole.completion)(outputs).model_dump())
        gen, _ = await unless_disconnected(request.receive, submit(variant, engine, prompts, params, prefix))
        parts = answer(gen.request_id)
        events = (parts.chat_stream if chat else parts.completion_stream)(gen.events(), len(prompts))
        return _EventStream(events, gen.close)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await read(request, CompletionRequest)
        variant, engine = route(body.model)
        prompts, params = [], []
        try:
            for prompt in body.prompts():
                ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
                for choice in range(body.n):
                    prompts.append(ids)
                    params.append(body.to_sampling_params(choice))
        except RequestError as exc:
            raise bad_request(exc, variant, {}) from None
        check_prompts(variant, engine, prompts, params, {})
        model_id = body.model or state.model_ids()[0]
        created = int(time.time())

        def answer(rid: str) -> OpenAIAnswer:
            return OpenAIAnswer(id=rid, created=created, model=model_id, n=body.n, logprobs=body.logprobs is not None,
                                include_usage=body.include_usage, token_strings=token_strings)

        return await openai_response(request, variant, engine, prompts, params, answer, chat=False, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await read(request, ChatCompletionRequest)
        variant, engine = route(body.model)
        names = {"prompt": "messages", "max_tokens": "max_completion_tokens"
                 if body.max_completion_tokens is not None else "max_tokens", "logprobs": "top_logprobs"}
        try:
            text = tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True)
        except Exception as exc:  # a template may raise_exception() on roles it does not accept
            raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages",
                           reason="invalid", variant=variant) from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        try:
            params = [body.to_sampling_params(engine.max_model_len - len(ids), c) for c in range(body.n)]
        except RequestError as exc:
            raise bad_request(exc, variant, names) from None
        prompts = [ids] * body.n
        check_prompts(variant, engine, prompts, params, names)
        model_id = body.model or state.model_ids()[0]
        created = int(time.time())

        def answer(rid: str) -> OpenAIAnswer:
            return OpenAIAnswer(id=rid, created=created, model=model_id, n=body.n, logprobs=body.logprobs,
                                include_usage=body.include_usage, token_strings=token_strings, token_bytes=token_bytes)

        return await openai_response(request, variant, engine, prompts, params, answer, chat=True, stream=body.stream)

    @app.post("/generate")
    async def generate(request: Request):
        body: GenerateRequest = await read(request, GenerateRequest)
        variant, engine = route(body.model)
        names = {"prompt": "inputs" if body.inputs is not None else "prompt", "max_tokens": "parameters.max_new_tokens",
                 "stop_token_ids": "parameters.stop_token_ids"}
        try:
            prompt = body.prompt_input()
            params = body.to_sampling_params()
        except RequestError as exc:
            raise bad_request(exc, variant, {}) from None
        ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        check_prompts(variant, engine, [ids], [params], names)
        p = body.parameters
        prefix = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if p.return_full_text else ""
        answer = GenerateAnswer(prefix=prefix, details=p.details, seed=p.seed, token_strings=token_strings)

        if not body.stream:
            outputs, _ = await run_to_end(request.receive, variant, engine, [ids], [params], "gen")
            return JSONResponse(answer.response(outputs[0]).model_dump(exclude_none=True))

        gen, _ = await unless_disconnected(request.receive, submit(variant, engine, [ids], [params], "gen"))
        return _EventStream(answer.stream(gen.events()), gen.close)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body: TokenizeRequest = await read(request, TokenizeRequest)
        variant, engine = route(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt", reason="invalid",
                           variant=variant)
        if body.messages is not None:
            text = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages],
                                                 add_generation_prompt=body.add_generation_prompt)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)
                            .model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body: DetokenizeRequest = await read(request, DetokenizeRequest)
        variant, engine = route(body.model)
        vocab = engine.model.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is out of range [0, {vocab - 1}]", param="tokens",
                           reason="invalid", variant=variant)
        return JSONResponse(DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
                            .model_dump())

    add_ui_routes(app, state)  # the web page at / and its /stats
    return app
