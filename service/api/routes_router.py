"""What the cache-aware routers read from a worker, and SGLang's `/generate`.

sglang-router (0.3.2) registers a worker from `GET /health`, `GET /server_info` (the model id is
its `served_model_name`) and `GET /model_info`; SGLang's older names `/get_server_info` and
`/get_model_info` answer the same. Its load monitor (power_of_two) polls `GET /get_load`. Its
`/flush_cache` is not offered: kvserve's prefix cache evicts least recently used blocks itself.
vllm-router (0.1.17) asks every worker, for each request it routes by cache, for the token ids of
the rendered prompt: `POST /v1/completions/render` (a list of one generate request per prompt, as
vLLM answers) and `POST /v1/chat/completions/render` (one generate request); it reads `token_ids`.
The render routes parse the body exactly as the generation routes do, so a body the worker would
refuse is refused here too.

/server_info leaves out `model_path`: sglang-router loads a tokenizer from it (downloading from the
Hugging Face Hub when it is no local directory), which a router in front of kvserve never needs.
"""
from __future__ import annotations

import importlib.metadata
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from model.sampling_params import SamplingParams
from service.api.pipeline import Job, Pipeline
from service.api.protocol import SSE_DONE, RequestBody, error_body, sse_event
from service.api.protocol_native import GenerateRequest
from service.api.protocol_openai import ChatCompletionRequest, CompletionRequest
from service.api.protocol_sglang import (
    SGLANG_NAMES,
    FinishReason,
    MetaInfo,
    SGLangGenerateRequest,
    SGLangGenerateResponse,
    is_sglang_generate,
)
from service.api.sse import EventStream
from service.engine.outputs import RequestOutput


def kvserve_version() -> str:
    try:
        return importlib.metadata.version("kvserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def generate_body_class(raw: bytes) -> type[RequestBody]:
    """The class a `/generate` body parses into: SGLang's request or TGI's (also for a body that is
    no JSON object, so that TGI's parse names what is wrong)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return GenerateRequest
    return SGLangGenerateRequest if isinstance(data, dict) and is_sglang_generate(data) else GenerateRequest


def _render(request_id: str, model: str, ids: list[int], params: SamplingParams, salt: str | None) -> dict:
    """vLLM's GenerateRequest shape: what the worker would run for this prompt."""
    sp = {f: getattr(params, f) for f in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                                          "stop", "stop_token_ids", "ignore_eos", "min_tokens")}
    return {"request_id": request_id, "model": model, "token_ids": ids, "sampling_params": sp, "cache_salt": salt}


class SGLangAnswer:
    """SGLang's `/generate` answer: `text`, `output_ids` and `meta_info` (finish_reason as
    `{"type": "stop" | "length" | "abort", ...}`); streamed, each event holds the text and ids so far."""

    def __init__(self, rid: str, max_tokens: int, eos_ids: frozenset[int]):
        self.rid, self.max_tokens, self.eos_ids = rid, max_tokens, eos_ids

    def _finish(self, out: RequestOutput, ids: list[int]) -> FinishReason | None:
        if not out.finished:
            return None
        if out.finish_reason == "length":
            return FinishReason(type="length", length=self.max_tokens)
        if out.finish_reason == "stop":
            return FinishReason(type="stop", matched=ids[-1] if ids and ids[-1] in self.eos_ids else None)
        return FinishReason(type="abort", message=out.error or out.finish_reason)

    def _event(self, outs: list[RequestOutput]) -> SGLangGenerateResponse:
        last = outs[-1]
        ids = [t for o in outs for t in o.new_token_ids]
        meta = MetaInfo(id=self.rid, finish_reason=self._finish(last, ids), prompt_tokens=last.prompt_tokens,
                        completion_tokens=last.completion_tokens, cached_tokens=last.num_cached_tokens,
                        e2e_latency=max(last.time - last.arrival_time, 0.0))
        return SGLangGenerateResponse(text="".join(o.new_text for o in outs), output_ids=ids, meta_info=meta)

    def response(self, outs: list[RequestOutput]) -> dict:
        return self._event(outs).model_dump()

    async def stream(self, events: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
        outs: list[RequestOutput] = []
        async for _, out in events:
            outs.append(out)
            if out.finish_reason == "error":
                yield sse_event(error_body(out.error or "generation failed", "internal_error"))
                continue
            yield sse_event(self._event(outs))
        yield SSE_DONE


def register_router_routes(app: FastAPI, pipe: Pipeline) -> None:
    state = pipe.state

    def server_info() -> dict:
        engine = state.engines[state.default_variant]
        c = engine.config
        return {"served_model_name": state.model_name, "model_ids": state.model_ids(), "version": kvserve_version(),
                "dp_size": 1, "tp_size": 1, "max_model_len": engine.max_model_len,
                "max_total_tokens": engine.kv_manager.num_blocks * c.block_size, "max_running_requests": c.max_num_seqs,
                "max_prefill_tokens": c.max_num_batched_tokens, "page_size": c.block_size}

    def model_info() -> dict:
        engine = state.engines[state.default_variant]
        return {"model_path": state.model_name, "served_model_name": state.model_name, "is_generation": True,
                "model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_context_length": engine.max_model_len,
                "vocab_size": engine.vocab_size}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> Response:
        pipe.admit(request)
        return JSONResponse(server_info())

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def get_model_info(request: Request) -> Response:
        pipe.admit(request)
        return JSONResponse(model_info())

    @app.get("/get_load")
    async def get_load(request: Request) -> Response:
        """SGLang's load report, one entry per engine (sglang-router's power_of_two and its load
        monitor read `num_waiting_reqs` / `num_tokens`)."""
        pipe.admit(request)
        loads = []
        for rank, engine in enumerate(state.engines.values()):
            stats = engine.stats()
            loads.append({"dp_rank": rank, "num_reqs": stats.num_running + stats.num_waiting,
                          "num_waiting_reqs": stats.num_waiting, "num_tokens": stats.kv.stored_tokens})
        return JSONResponse(loads)

    @app.post("/v1/completions/render")
    async def completions_render(request: Request) -> Response:
        body = await pipe.read(request, CompletionRequest)
        variant, engine = pipe.route(body.model)
        with pipe.refusals(variant):
            texts = body.prompts()
            params = body.to_sampling_params()
        pipe.limit_prompt(variant, texts)
        model = body.model or state.model_ids()[0]
        rendered = [_render(f"cmpl-render-{i}", model, await pipe.encode(p), params, body.cache_salt)
                    for i, p in enumerate(texts)]
        return await pipe.json(sum(len(r["token_ids"]) for r in rendered), lambda: rendered)

    @app.post("/v1/chat/completions/render")
    async def chat_render(request: Request) -> Response:
        body = await pipe.read(request, ChatCompletionRequest)
        variant, engine = pipe.route(body.model)
        with pipe.refusals(variant, {"prompt": "messages"}):
            body.check_continuation()
            variables = body.template_variables()
        ids = await pipe.chat_ids(variant, body.template_messages(), add_generation_prompt=body.add_generation_prompt,
                                  continue_final_message=body.continue_final_message, variables=variables)
        with pipe.refusals(variant, {"max_tokens": "max_completion_tokens"}):
            params = body.to_sampling_params(state.limits.default_max_tokens(engine.max_model_len - len(ids), 1, 0))
        rendered = _render("chatcmpl-render", body.model or state.model_ids()[0], ids, params, body.cache_salt)
        return await pipe.json(len(ids), lambda: rendered)


async def sglang_generate(pipe: Pipeline, request: Request, body: SGLangGenerateRequest) -> Response:
    """SGLang's `/generate` for one prompt (text or input_ids), as one JSON answer or as SSE."""
    variant, engine = pipe.route(body.model)
    names = SGLANG_NAMES | {"structured_output": "sampling_params"}
    with pipe.refusals(variant, names):
        prompt = body.prompt()
        params = body.to_sampling_params()
    if isinstance(prompt, str):
        pipe.limit_prompt(variant, [prompt], "text")
    ids = await pipe.encode(prompt)
    job = Job(variant, engine, [ids], [params], "gen", names, pipe.cache_salt(request, None))
    eos = pipe.tokenizer.eos_token_ids | frozenset(params.stop_token_ids)
    if not body.stream:
        outputs, rid = await pipe.complete(request, job)
        answer = SGLangAnswer(body.rid or rid, params.max_tokens, eos)
        return await pipe.json(sum(len(o.new_token_ids) for o in outputs[0]), lambda: answer.response(outputs[0]))
    gen = await pipe.start(request, job)
    answer = SGLangAnswer(body.rid or gen.request_id, params.max_tokens, eos)
    return EventStream(answer.stream(gen.events()), gen.close, keep_alive_s=pipe.state.sse_keep_alive_s)

