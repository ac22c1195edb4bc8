"""The one path every route takes: admit → read → route → prompt ids → params → submit → answer.

Route handlers (service.api.routes) say only what differs between endpoints: the body class, how
its prompt becomes token ids, its SamplingParams, the names its fields have in error messages, and
the answer's shape. Everything else is here, once: the API key and draining checks, the size-capped
read and strict parse of the body, routing `model` to an engine, tokenizing and chat rendering
(large inputs off the event loop; every failure a 4xx naming the field), submitting to the engine
(which validates each request once, in `Engine.validate`), and aborting on disconnect.
No FastAPI here (Starlette's Request only).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from model.sampling_params import SamplingParams
from service.api.disconnect import unless_disconnected
from service.api.errors import APIError, bad_request, unavailable
from service.api.generation import Generation, run_to_end, submit
from service.api.limits import shown
from service.api.protocol import InvalidBody, parse_body, unknown_fields
from service.api.state import ServerState
from service.engine import Engine, RequestError, RequestOutput

log = logging.getLogger("kvserve.api")
Body = TypeVar("Body", bound=BaseModel)
_MAX_DRAIN_BYTES = 64 << 20  # read past an oversized body up to this, so the client sees the 413
# Text shorter than this is tokenized on the event loop (microseconds); longer text, every chat
# rendering, bodies past INLINE_BODY_BYTES (parsing 3 MB of JSON takes ~0.5 s) and answers of more
# than INLINE_CHARS tokens (rendering 4M token ids as JSON takes ~0.6 s) go to a small thread pool,
# so one big request never stalls /health or other streams.
INLINE_CHARS = 4096
INLINE_BODY_BYTES = 64 << 10
TOKENIZER_THREADS = 2


@dataclass(slots=True)
class Job:
    """One HTTP request's engine work: one engine request per (prompt, choice)."""
    variant: str
    engine: Engine
    prompts: list[list[int]]
    params: list[SamplingParams]
    prefix: str                                      # request id prefix: cmpl, chatcmpl, gen
    names: Mapping[str, str] = field(default_factory=dict)  # engine field -> the endpoint's name for it
    cache_salt: bytes | None = None                  # prefix-cache tenant (Pipeline.cache_salt)


class Pipeline:
    def __init__(self, state: ServerState):
        self.state = state
        self.tokenizer = state.tokenizer
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="kvserve-tokenizer")

    # ---- admit, read, route ----

    @staticmethod
    def _bearer(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    def admit(self, request: Request) -> None:
        """API key (constant-time compare against every key), then refuse while draining."""
        keys = self.state.api_keys
        if keys:
            token = (self._bearer(request) or "").encode()
            matches = [secrets.compare_digest(token, key.encode()) for key in keys]  # no early exit
            if not any(matches):
                raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key", reason="unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})
        if self.state.draining:
            raise unavailable("the server is shutting down and admits no new requests", "draining", "draining")

    async def read(self, request: Request, cls: type[Body], pick: Callable[[bytes], type[Any]] | None = None) -> Body:
        """admit, then the body (capped at max_body_bytes: 413 beyond) parsed strictly into `cls`
        (or into `pick(raw body)`, for a route that takes two shapes). A body that says it is
        something other than JSON is refused (415), not guessed at."""
        self.admit(request)
        media_type = request.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise APIError(415, f"Content-Type {shown(media_type)} is not supported: send the body as application/json",
                           code="unsupported_media_type", reason="invalid")
        limit = self.state.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        too_large = length.isdigit() and int(length) > limit
        chunks, size = [], 0
        deadline = self.state.read_timeout
        if not too_large or int(length) <= _MAX_DRAIN_BYTES:
            try:
                async with asyncio.timeout(deadline):  # a half-sent body must not hold its connection
                    async for chunk in request.stream():
                        size += len(chunk)
                        too_large = too_large or size > limit
                        if not too_large:
                            chunks.append(chunk)
                        elif size > _MAX_DRAIN_BYTES:
                            break
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {deadline:g}s (--read-timeout)",
                               code="request_timeout", reason="invalid", headers={"Connection": "close"}) from None
        if too_large:
            raise APIError(413, f"request body is larger than the limit of {limit:,} bytes (--max-body-bytes)",
                           code="request_too_large", reason="invalid")
        raw = b"".join(chunks)
        if pick is not None:
            cls = pick(raw)
        try:
            body = await self._off_loop(len(raw) < INLINE_BODY_BYTES, parse_body, cls, raw)
        except InvalidBody as exc:
            raise APIError(exc.status, str(exc), param=exc.param, reason="invalid") from None
        unknown = unknown_fields(body)
        if unknown and self.state.reject_unknown_fields:
            raise APIError(400, f"{unknown[0]}: unknown field (the server refuses unknown fields: "
                           f"--reject-unknown-fields); unknown here: {', '.join(unknown)}", param=unknown[0], reason="invalid")
        if unknown:  # once per request, as vLLM does: a misspelt field should not pass unnoticed
            log.warning("%s %s: ignored unknown fields: %s", request.method, request.url.path, ", ".join(unknown))
        return body

    def cache_salt(self, request: Request, salt: str | None) -> bytes | None:
        """The request's prefix-cache tenant: its `cache_salt`, and with --prefix-cache-scope
        api-key the API key it was admitted with (hashed), so tenants never share cached blocks."""
        parts = []
        if self.state.prefix_cache_scope == "api-key":
            parts.append(b"key:" + hashlib.sha256((self._bearer(request) or "").encode()).digest())
        if salt is not None:
            parts.append(b"salt:" + salt.encode("utf-8", "surrogatepass"))
        return b"\0".join(parts) if parts else None

    def route(self, model: str | None) -> tuple[str, Engine]:
        try:
            variant = self.state.route(model)
        except LookupError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found", reason="invalid") from None
        return variant, self.state.engines[variant]

    @contextmanager
    def refusals(self, variant: str, names: Mapping[str, str] | None = None) -> Iterator[None]:
        """RequestError (a bad value in the body) inside the block -> 400 naming the endpoint's field."""
        try:
            yield
        except RequestError as exc:
            raise bad_request(exc, variant, names or {}) from None

    # ---- text -> token ids (off the event loop when large) ----

    async def _off_loop(self, inline: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inline:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def encode(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (or the ids themselves; the engine checks their range)."""
        if not isinstance(prompt, str):
            return list(prompt)
        return await self._off_loop(len(prompt) < INLINE_CHARS, self.tokenizer.encode, prompt,
                                    add_special_tokens=add_special_tokens)

    def limit_prompt(self, variant: str, texts: Sequence[Any], param: str = "prompt") -> None:
        """400 when the prompt text of one request is longer than the limit, before any tokenizing."""
        with self.refusals(variant):
            self.state.limits.check_prompt_chars(texts, self.state.engines[variant].max_model_len, param)

    async def chat_ids(self, variant: str, messages: Sequence[Mapping[str, Any]], *, param: str = "messages",
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       variables: Mapping[str, Any] | None = None) -> list[int]:
        """The chat template rendered for `messages` and tokenized (the template writes the special
        tokens); a template that refuses them (unknown role, empty list, ...) is a 400, and so are
        more messages or characters than the limits allow (checked before rendering).
        `continue_final_message`: the text ends right after the last message's content (no
        end-of-turn), so the model continues it; `variables`: extra template variables."""
        with self.refusals(variant):
            self.state.limits.check_messages(len(messages), param)
        self.limit_prompt(variant, [m.get("content") for m in messages], param)

        def render() -> list[int]:  # message content is data: only the template's markers are control tokens
            return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message, **dict(variables or {}))

        try:
            return await self._off_loop(False, render)
        except ValueError as exc:  # ChatTemplateError, or no template at all
            raise APIError(400, f"{param}: the chat template refused them: {exc}", param=param, reason="invalid",
                           variant=variant) from None

    async def decode(self, ids: Sequence[int]) -> str:
        return await self._off_loop(len(ids) < INLINE_CHARS, self.tokenizer.decode, ids, skip_special_tokens=False)

    async def json(self, size: int, render: Callable[[], Any]) -> JSONResponse:
        """A JSON answer of what `render()` returns (a dict); built off the event loop when it holds
        `size` >= INLINE_CHARS tokens, so one large answer never stalls the others."""
        return await self._off_loop(size < INLINE_CHARS, lambda: JSONResponse(render()))

    # ---- run ----

    def check(self, job: Job) -> None:
        """The limits the request's SamplingParams must keep together (service.api.limits): a 400
        before anything runs. The engine validates each request itself, once, when it is submitted."""
        with self.refusals(job.variant, job.names):
            self.state.limits.check_params(job.params, job.engine.vocab_size, job.engine.max_model_len)

    async def complete(self, request: Request, job: Job) -> tuple[list[list[RequestOutput]], str]:
        """Every output of every choice (for a JSON answer), or the APIError to answer instead;
        aborted if the client leaves first."""
        self.check(job)
        return await run_to_end(request.receive, job.variant, job.engine, job.prompts, job.params, job.prefix,
                                job.names, job.cache_salt)

    async def start(self, request: Request, job: Job) -> Generation:
        """A Generation to stream, as soon as the engine has accepted it (submission errors raised
        before anything is sent; the first token may still be a long prefill away)."""
        self.check(job)
        gen, _ = await unless_disconnected(
            request.receive, submit(job.variant, job.engine, job.prompts, job.params, job.prefix, job.names,
                                    job.cache_salt, first_outputs=False))
        return gen
