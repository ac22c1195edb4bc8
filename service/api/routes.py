"""The routes: each says only what differs between endpoints; `Pipeline` does the rest.

OpenAI-compatible `/v1/completions`, `/v1/chat/completions`, `/v1/models` and `/v1/models/{id}`;
Text Generation Inference's `/generate`, `/generate_stream`, `POST /` and `GET /info`; `/tokenize`,
`/detokenize`; `/health` and `/metrics` (open to probes and scrapers). `/generate` also takes
SGLang's shape, and the routes the cache-aware routers read are in service.api.routes_router.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from model.sampling_params import SamplingParams
from service.api.chat_job import chat_job
from service.api.echo import Echo
from service.api.errors import APIError
from service.api.pipeline import Job, Pipeline
from service.api.protocol_native import (
    GENERATE_NAMES,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from service.api.protocol_openai import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from service.api.protocol_sglang import SGLangGenerateRequest
from service.api.protocol_structured import StructuredFields
from service.api.responses import GenerateAnswer, OpenAIAnswer
from service.api.routes_router import generate_body_class, register_router_routes, sglang_generate
from service.api.sse import EventStream
from service.api.state import TGI_PLACEHOLDER_MODELS
from service.api.tgi_info import tgi_info
from service.api.tool_stream import ToolAnswer
from service.engine import RequestError


def register_routes(app: FastAPI, pipe: Pipeline) -> None:
    state, tokenizer = pipe.state, pipe.tokenizer

    def token_strings(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids) if ids else []

    def structured_names(body: StructuredFields) -> dict[str, str]:
        """The engine's `structured_output` errors named after the field the constraint came in."""
        _, param = body.structured_output()
        return {"structured_output": param} if param else {}

    async def openai_answer(request: Request, job: Job, model: str | None, n: int, logprobs: bool,
                            include_usage: bool, *, chat: bool, stream: bool, continuous_usage: bool = False,
                            echo: Echo | None = None, tools: ToolAnswer | None = None) -> Response:
        """Run one OpenAI call's engine requests; answer as one JSON body or as SSE."""
        model_id = state.model_ids()[0] if model is None or model in TGI_PLACEHOLDER_MODELS else model
        created = int(time.time())

        def answer(rid: str) -> OpenAIAnswer:
            return OpenAIAnswer(id=rid, created=created, model=model_id, n=n, logprobs=logprobs,
                                include_usage=include_usage, token_strings=token_strings,
                                token_bytes=tokenizer.token_bytes if chat else None,
                                system_fingerprint=state.system_fingerprint, continuous_usage=continuous_usage,
                                echo=echo, tools=tools)

        if not stream:
            outputs, rid = await pipe.complete(request, job)
            whole = answer(rid)
            size = sum(len(out.new_token_ids) * (1 + len(out.logprobs[0].top) if out.logprobs else 1)
                       for outs in outputs for out in outs)
            return await pipe.json(size, lambda: (whole.chat if chat else whole.completion)(outputs).model_dump())
        gen = await pipe.start(request, job)
        parts = answer(gen.request_id)
        events = (parts.chat_stream if chat else parts.completion_stream)(gen.events(), len(job.prompts))
        return EventStream(events, gen.close, keep_alive_s=state.sse_keep_alive_s)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        dead = [v for v, e in state.engines.items() if not e.is_alive]
        if dead:
            return JSONResponse({"status": "unhealthy", "dead_variants": dead}, status_code=503)
        return JSONResponse({"status": "ok", "variants": list(state.engines)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/info")
    async def info(request: Request) -> Response:
        pipe.admit(request)
        return JSONResponse(tgi_info(state))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        pipe.admit(request)
        cards = [ModelCard(id=mid, created=state.created, root=state.model_name, max_model_len=e.max_model_len)
                 for mid, e in zip(state.model_ids(), state.engines.values())]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> Response:
        pipe.admit(request)
        variant, engine = pipe.route(model_id)
        return JSONResponse(ModelCard(id=model_id, created=state.created, root=state.model_name,
                                      max_model_len=engine.max_model_len).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await pipe.read(request, CompletionRequest)
        variant, engine = pipe.route(body.model)
        with pipe.refusals(variant):
            texts = body.prompts()
            choices = [body.to_sampling_params(c) for c in range(body.n)]
            names = structured_names(body)
        pipe.limit_prompt(variant, texts)
        prompts = [await pipe.encode(p) for p in texts]
        job = Job(variant, engine, [ids for ids in prompts for _ in choices], choices * len(prompts), "cmpl", names,
                  pipe.cache_salt(request, body.cache_salt))
        echo = None
        if body.echo or body.prompt_logprobs is not None:
            shown = [t if isinstance(t, str) else await pipe.decode(t) for t in texts]
            echo = Echo([t for t in shown for _ in choices], job.prompts, body.echo, body.logprobs, body.prompt_logprobs,
                        body.prompt_only, token_strings, tokenizer.decode)
        return await openai_answer(request, job, body.model, body.n, body.logprobs is not None, body.include_usage,
                                   chat=False, stream=body.stream, continuous_usage=body.continuous_usage, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await pipe.read(request, ChatCompletionRequest)
        names = {"prompt": "messages", "logprobs": "top_logprobs",
                 "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"}
        work = await chat_job(pipe, request, body, names)
        return await openai_answer(request, work.job, body.model, body.n, body.logprobs, body.include_usage,
                                   chat=True, stream=body.stream, continuous_usage=body.continuous_usage,
                                   tools=work.tools)

    async def tgi_generate(request: Request, *, stream: bool | None, as_list: bool = False, sglang: bool = False) -> Response:
        """TGI's generation: `stream` fixed by the route, or None to follow the body's `stream`;
        with `sglang`, a body in SGLang's shape is SGLang's generation instead."""
        body = await pipe.read(request, GenerateRequest, generate_body_class if sglang else None)
        if isinstance(body, SGLangGenerateRequest):
            return await sglang_generate(pipe, request, body)
        variant, engine = pipe.route(body.model)
        p = body.parameters
        names = GENERATE_NAMES | {"prompt": "inputs", "structured_output": "parameters.grammar.value"}
        streaming = body.stream if stream is None else stream
        with pipe.refusals(variant, names):
            params: SamplingParams = body.to_sampling_params()
            if p.decoder_input_details and streaming:  # as TGI answers it
                raise RequestError("parameters.decoder_input_details=true is not supported when streaming tokens",
                                   "parameters.decoder_input_details")
        pipe.limit_prompt(variant, [body.inputs], "inputs")
        ids = await pipe.encode(body.inputs)
        if p.truncate is not None and len(ids) > p.truncate:
            ids = ids[-p.truncate:]  # TGI: keep the last `truncate` tokens
        job = Job(variant, engine, [ids], [params], "gen", names, pipe.cache_salt(request, body.cache_salt))
        answer = GenerateAnswer(prefix=body.inputs if p.return_full_text else "", details=p.details, seed=p.seed,
                                top_n=p.top_n_tokens or 0, input_length=len(ids), token_strings=token_strings,
                                special_ids=tokenizer.special_token_ids,
                                eos_ids=tokenizer.eos_token_ids | frozenset(params.stop_token_ids),
                                prompt_ids=ids if p.decoder_input_details else None, decode=tokenizer.decode)
        if not streaming:
            outputs, _ = await pipe.complete(request, job)
            size = sum(len(out.new_token_ids) for out in outputs[0]) * (1 + (params.logprobs or 0))

            def render() -> Any:
                result = answer.response(outputs[0]).model_dump(exclude_none=True)
                return [result] if as_list else result
            return await pipe.json(size, render)
        gen = await pipe.start(request, job)
        return EventStream(answer.stream(gen.events()), gen.close, keep_alive_s=state.sse_keep_alive_s)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await tgi_generate(request, stream=None, sglang=True)

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await tgi_generate(request, stream=True)

    @app.post("/")
    async def compat_generate(request: Request) -> Response:
        """TGI's root route: /generate_stream when `stream` is true, else /generate's answer in a list."""
        return await tgi_generate(request, stream=None, as_list=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await pipe.read(request, TokenizeRequest)
        variant, engine = pipe.route(body.model)
        if body.messages is not None and body.prompt is None:
            ids = await pipe.chat_ids(variant, [m.as_template_message() for m in body.messages],
                                      add_generation_prompt=body.add_generation_prompt,
                                      continue_final_message=body.continue_final_message)
        elif body.prompt is not None and body.messages is None:
            pipe.limit_prompt(variant, [body.prompt])
            ids = await pipe.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give exactly one of prompt or messages", param="prompt", reason="invalid",
                           variant=variant)
        # model_construct: validating millions of ids would hold the GIL for as long as tokenizing took
        return await pipe.json(len(ids), lambda: vars(TokenizeResponse.model_construct(
            tokens=ids, count=len(ids), max_model_len=engine.max_model_len)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await pipe.read(request, DetokenizeRequest)
        variant, engine = pipe.route(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is out of range [0, {engine.vocab_size - 1}]",
                           param="tokens", reason="invalid", variant=variant)
        text = await pipe.decode(body.tokens)
        return await pipe.json(len(body.tokens), lambda: DetokenizeResponse(prompt=text).model_dump())

    register_router_routes(app, pipe)
