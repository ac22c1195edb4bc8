"""The HTTP API: the only module that imports FastAPI.

`create_app(state)` serves OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and
`/v1/models`, the native TGI-like `/generate`, `/tokenize` / `/detokenize`, `/health` and
`/metrics`. Each generation handler: authorize, read the body (size-capped), parse it
(service.protocol), pick the engine from `model`, tokenize, validate against the engine, submit
one engine request per choice, then answer as JSON or as server-sent events.

A client that goes away is noticed on the ASGI receive channel (`http.disconnect`) both while
waiting for a JSON answer and while streaming; its engine requests are aborted at once so their KV
blocks are freed. Every error a client can cause is a 4xx with OpenAI's error body.
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import protocol as P
from service.errors import EngineDeadError, QueueFullError, RequestError
from service.outputs import RequestOutput

if TYPE_CHECKING:
    from service.engine import Engine
    from service.server import ServerState

_MAX_DRAIN_BYTES = 64 << 20  # read past an oversized body up to this, so the client sees the 413


class APIError(Exception):
    """An error answer in OpenAI's shape; `reason` counts it in kvserve_requests_rejected_total."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, reason: str | None = None, variant: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.reason, self.variant, self.headers = reason, variant, headers


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    body = P.error_body(message, type_, param, code).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _unavailable(message: str, code: str, reason: str | None, variant: str | None = None) -> APIError:
    return APIError(503, message, "service_unavailable_error", code=code, reason=reason, variant=variant,
                    headers={"Retry-After": "1"})


async def _wait_for_disconnect(receive) -> None:
    """Returns when the ASGI server reports `http.disconnect` (call only once the body is read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """The result of `coro`, or _ClientGone (with `coro` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _ClientGone()
    return task.result()


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
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
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


class _Generation:
    """The engine requests behind one HTTP request (n choices x prompts), merged into one stream of
    (choice index, output). `start()` raises submission errors before anything is answered."""

    def __init__(self, engine: "Engine", prompts: list[list[int]], params: list, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps = [asyncio.ensure_future(self._pump(i, engine.generate(p, sp, rid)))
                       for i, (p, sp, rid) in enumerate(zip(prompts, params, self.ids))]
        self._ready: list[tuple[int, RequestOutput]] = []
        self.finished = [False] * len(prompts)

    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                self._queue.put_nowait((index, out))
        except Exception as exc:  # submission errors (queue full, ...) reach start() this way
            self._queue.put_nowait((index, exc))

    async def start(self) -> list[RequestOutput]:
        """Waits for every choice's first output (engine errors raised as they are); returns them."""
        firsts: dict[int, RequestOutput] = {}
        while len(firsts) < len(self.ids):
            index, item = await self._queue.get()
            if isinstance(item, Exception):
                self.close()
                raise item
            firsts.setdefault(index, item)
            self._ready.append((index, item))
        return [firsts[i] for i in range(len(self.ids))]

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output until all choices finish (those start() saw come first)."""
        try:
            while not all(self.finished):
                index, item = self._ready.pop(0) if self._ready else await self._queue.get()
                if isinstance(item, Exception):
                    raise item
                self.finished[index] = item.finished
                yield index, item
        finally:
            self.close()

    def close(self) -> None:
        """Stop everything unfinished; the engine frees its blocks within one step."""
        for pump in self._pumps:
            pump.cancel()
        for rid, done in zip(self.ids, self.finished):
            if not done:
                self.engine.abort(rid)


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _failed(outputs: list[RequestOutput]) -> APIError | None:
    """The error to answer instead of a result: an engine error, or a timeout before any token."""
    for out in outputs:
        if out.finish_reason == "error":
            return APIError(500, out.error or "internal error during generation", "internal_error", code="engine_error")
        if out.finish_reason == "timeout" and out.completion_tokens == 0:
            return _unavailable(out.error or "request timed out before its first token", "timeout", None)
    return None


def create_app(state: "ServerState") -> FastAPI:
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None, openapi_url=None)
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

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, exc: ClientDisconnect):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error_response(500, f"internal server error: {type(exc).__name__}", "internal_error")

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
            raise _unavailable("the server is shutting down and admits no new requests", "draining", "draining")

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
            return P.parse_body(cls, b"".join(chunks))
        except P.InvalidBody as exc:
            raise APIError(exc.status, str(exc), param=exc.param, reason="invalid") from None

    def route(model: str | None) -> tuple[str, "Engine"]:
        try:
            variant = state.route(model)
        except LookupError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found", reason="invalid") from None
        return variant, state.engines[variant]

    def bad_request(exc: RequestError, variant: str, names: dict[str, str], reason: str = "invalid") -> APIError:
        """400 for what the engine or SamplingParams refused, under the field's name in this endpoint."""
        param = names.get(exc.param, exc.param)
        message = str(exc) if param == exc.param else f"{param}: {exc}"
        code = "context_length_exceeded" if reason == "too_long" else None
        return APIError(400, message, param=param, code=code, reason=reason, variant=variant)

    def check(variant: str, engine: "Engine", prompts: list[list[int]], params, names: dict[str, str]) -> None:
        """Everything the engine would refuse, refused here with the field's API name."""
        vocab = engine.model.config.vocab_size
        for prompt, sp in zip(prompts, params):
            if not prompt:
                raise bad_request(RequestError("prompt is empty: it must have at least 1 token", "prompt"),
                                  variant, names)
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(RequestError(f"prompt token id {bad} is out of range [0, {vocab - 1}]", "prompt"),
                                  variant, names)
            try:
                engine.validate(len(prompt), sp)
            except RequestError as exc:
                raise bad_request(exc, variant, names,
                                  "too_long" if exc.param in ("prompt", "max_tokens") else "invalid") from None

    async def submit(variant: str, engine: "Engine", prompts, params, prefix: str) -> tuple[_Generation, list]:
        gen = _Generation(engine, prompts, params, _request_id(prefix))
        try:
            firsts = await gen.start()
        except QueueFullError as exc:
            raise _unavailable(f"server busy: {exc}; retry later", "queue_full", "queue_full", variant) from None
        except EngineDeadError as exc:
            raise _unavailable(str(exc), "engine_unavailable", "draining", variant) from None
        except RequestError as exc:
            raise bad_request(exc, variant, {}) from None
        except BaseException:
            gen.close()
            raise
        error = _failed(firsts)
        if error is not None:
            gen.close()
            raise error
        return gen, firsts

    async def run_to_end(request: Request, variant, engine, prompts, params, prefix) -> tuple[list[list[RequestOutput]], str]:
        """Non-streaming: every output of every choice, or an error; aborted if the client leaves."""
        async def collect():
            gen, _ = await submit(variant, engine, prompts, params, prefix)
            outputs: list[list[RequestOutput]] = [[] for _ in prompts]
            async for index, out in gen.events():
                outputs[index].append(out)
            return outputs, gen.request_id

        outputs, rid = await _unless_disconnected(request, collect())
        error = _failed([outs[-1] for outs in outputs])
        if error is not None:
            raise error
        return outputs, rid

    def token_strings(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids) if ids else []

    token_bytes = getattr(tokenizer, "token_bytes", None)  # exact bytes where the tokenizer knows them

    def usage(outputs_by_choice: list[list[RequestOutput]], n: int) -> P.Usage:
        """Each distinct prompt counted once (its n choices share it)."""
        lasts = [outs[-1] for outs in outputs_by_choice]
        groups = [lasts[i:i + n] for i in range(0, len(lasts), n)]
        prompt = sum(g[0].prompt_tokens for g in groups)
        completion = sum(o.completion_tokens for o in lasts)
        cached = sum(max(o.num_cached_tokens for o in g) for g in groups)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))

    def logprob_entries(outs: list[RequestOutput]) -> list:
        return [lp for o in outs for lp in (o.logprobs or [])]

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
        cards = [P.ModelCard(id=mid, created=state.created, root=state.model_name, max_model_len=e.max_model_len)
                 for mid, e in zip(state.model_ids(), state.engines.values())]
        return JSONResponse(P.ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: P.CompletionRequest = await read(request, P.CompletionRequest)
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
        check(variant, engine, prompts, params, {})
        model_id = body.model or state.model_ids()[0]
        created = int(time.time())
        with_logprobs = body.logprobs is not None

        if not body.stream:
            outputs, rid = await run_to_end(request, variant, engine, prompts, params, "cmpl")
            choices = [P.CompletionChoice(
                index=i, text="".join(o.new_text for o in outs), finish_reason=outs[-1].finish_reason,
                logprobs=P.completion_logprobs(logprob_entries(outs), token_strings) if with_logprobs else None)
                for i, outs in enumerate(outputs)]
            resp = P.CompletionResponse(id=rid, created=created, model=model_id, choices=choices,
                                        usage=usage(outputs, body.n))
            return JSONResponse(resp.model_dump())

        gen, _ = await _unless_disconnected(request, submit(variant, engine, prompts, params, "cmpl"))
        rid = gen.request_id

        async def events():
            offsets = [0] * len(prompts)
            by_choice: list[list[RequestOutput]] = [[] for _ in prompts]
            async for i, out in gen.events():
                by_choice[i].append(out)
                lp = None
                if with_logprobs:
                    lp = P.completion_logprobs(out.logprobs or [], token_strings, offsets[i])
                    if lp.tokens:
                        offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                choice = P.CompletionChoice(index=i, text=out.new_text, logprobs=lp, finish_reason=out.finish_reason)
                yield P.sse_event(P.CompletionResponse(id=rid, created=created, model=model_id, choices=[choice]))
                if out.finish_reason == "error":
                    yield P.sse_event(P.error_body(out.error or "generation failed", "internal_error"))
            if body.include_usage:
                yield P.sse_event(P.CompletionResponse(id=rid, created=created, model=model_id, choices=[],
                                                       usage=usage(by_choice, body.n)))
            yield P.SSE_DONE

        return _EventStream(events(), gen.close)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: P.ChatCompletionRequest = await read(request, P.ChatCompletionRequest)
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
        check(variant, engine, prompts, params, names)
        model_id = body.model or state.model_ids()[0]
        created = int(time.time())

        if not body.stream:
            outputs, rid = await run_to_end(request, variant, engine, prompts, params, "chatcmpl")
            choices = [P.ChatChoice(
                index=i, message=P.AssistantMessage(content="".join(o.new_text for o in outs)),
                finish_reason=outs[-1].finish_reason,
                logprobs=P.chat_logprobs(logprob_entries(outs), token_strings, token_bytes) if body.logprobs else None)
                for i, outs in enumerate(outputs)]
            resp = P.ChatCompletionResponse(id=rid, created=created, model=model_id, choices=choices,
                                            usage=usage(outputs, body.n))
            return JSONResponse(resp.model_dump())

        gen, _ = await _unless_disconnected(request, submit(variant, engine, prompts, params, "chatcmpl"))
        rid = gen.request_id

        def chunk(choices, usage_=None) -> bytes:
            return P.sse_event(P.ChatCompletionChunk(id=rid, created=created, model=model_id, choices=choices,
                                                     usage=usage_))

        async def events():
            by_choice: list[list[RequestOutput]] = [[] for _ in prompts]
            for i in range(len(prompts)):
                yield chunk([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))])
            async for i, out in gen.events():
                by_choice[i].append(out)
                lp = P.chat_logprobs(out.logprobs or [], token_strings, token_bytes) if body.logprobs else None
                yield chunk([P.ChatChunkChoice(index=i, delta=P.Delta(content=out.new_text), logprobs=lp,
                                               finish_reason=out.finish_reason)])
                if out.finish_reason == "error":
                    yield P.sse_event(P.error_body(out.error or "generation failed", "internal_error"))
            if body.include_usage:
                yield chunk([], usage(by_choice, body.n))
            yield P.SSE_DONE

        return _EventStream(events(), gen.close)

    @app.post("/generate")
    async def generate(request: Request):
        body: P.GenerateRequest = await read(request, P.GenerateRequest)
        variant, engine = route(body.model)
        names = {"prompt": "inputs" if body.inputs is not None else "prompt", "max_tokens": "parameters.max_new_tokens",
                 "stop_token_ids": "parameters.stop_token_ids"}
        try:
            prompt = body.prompt_input()
            params = body.to_sampling_params()
        except RequestError as exc:
            raise bad_request(exc, variant, {}) from None
        ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        check(variant, engine, [ids], [params], names)
        p = body.parameters
        prefix = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if p.return_full_text else ""

        def details(outs: list[RequestOutput]) -> P.GenerateDetails:
            last = outs[-1]
            token_ids = [t for o in outs for t in o.new_token_ids]
            lps = {i: e.logprob for i, e in enumerate(logprob_entries(outs))}
            tokens = [P.GeneratedToken(id=t, text=s, logprob=lps.get(i))
                      for i, (t, s) in enumerate(zip(token_ids, token_strings(token_ids)))]
            return P.GenerateDetails(
                finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                generated_tokens=last.completion_tokens, cached_tokens=last.num_cached_tokens, seed=p.seed,
                token_ids=token_ids, tokens=tokens, timings=P.Timings(
                    queue_time_s=None if last.first_scheduled_time is None else last.first_scheduled_time - last.arrival_time,
                    ttft_s=None if last.first_token_time is None else last.first_token_time - last.arrival_time,
                    e2e_s=last.time - last.arrival_time))

        if not body.stream:
            outputs, _ = await run_to_end(request, variant, engine, [ids], [params], "gen")
            outs = outputs[0]
            text = prefix + "".join(o.new_text for o in outs)
            return JSONResponse(P.GenerateResponse(generated_text=text, details=details(outs) if p.details else None)
                                .model_dump(exclude_none=True))

        gen, _ = await _unless_disconnected(request, submit(variant, engine, [ids], [params], "gen"))

        async def events():
            outs: list[RequestOutput] = []
            async for _, out in gen.events():
                outs.append(out)
                last = out.finished
                yield P.sse_event(P.GenerateStreamEvent(
                    text=out.new_text, token_ids=out.new_token_ids, finish_reason=out.finish_reason,
                    generated_text=prefix + "".join(o.new_text for o in outs) if last else None,
                    details=details(outs) if last and p.details else None))
                if out.finish_reason == "error":
                    yield P.sse_event(P.error_body(out.error or "generation failed", "internal_error"))
            yield P.SSE_DONE

        return _EventStream(events(), gen.close)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body: P.TokenizeRequest = await read(request, P.TokenizeRequest)
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
        return JSONResponse(P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)
                            .model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body: P.DetokenizeRequest = await read(request, P.DetokenizeRequest)
        variant, engine = route(body.model)
        vocab = engine.model.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is out of range [0, {vocab - 1}]", param="tokens",
                           reason="invalid", variant=variant)
        return JSONResponse(P.DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
                            .model_dump())

    return app
