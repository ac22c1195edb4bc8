"""A chat request's engine work, from its body: the template rendered (tools included, in the
server's tool-call format), the SamplingParams of its n choices (the tool grammar, if any), and how
its answer reads tool calls. Shared by `/v1/chat/completions` and `/v1/responses`. No FastAPI here.
"""
from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from service.api.pipeline import Job, Pipeline
from service.api.protocol_openai import ChatCompletionRequest
from service.api.tool_calls import FORMATS, template_messages
from service.api.tool_stream import ToolAnswer


@dataclass(slots=True)
class ChatJob:
    job: Job
    tools: ToolAnswer | None    # how the answer's text becomes tool calls (None: plain text)


async def chat_job(pipe: Pipeline, request: Request, body: ChatCompletionRequest, names: dict[str, str],
                   prefix: str = "chatcmpl") -> ChatJob:
    """`names`: the endpoint's names for the engine's fields (the structured-output and tool ones are added)."""
    variant, engine = pipe.route(body.model)
    with pipe.refusals(variant, names):
        body.check_continuation()
        variables = body.template_variables()
        _, param = body.structured_output()
        if param:
            names["structured_output"] = param
        tools = body.tool_request()
    fmt = FORMATS[pipe.state.tool_call_parser]
    native = "tools" in (getattr(pipe.tokenizer, "chat_template", None) or "")  # the template renders tools itself
    messages, tool_variables = template_messages(body.template_messages(), tools, fmt, native)
    ids = await pipe.chat_ids(variant, messages, add_generation_prompt=body.add_generation_prompt,
                              continue_final_message=body.continue_final_message, variables=variables | tool_variables)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    room = pipe.state.limits.default_max_tokens(engine.max_model_len - len(ids), body.n, top)
    grammar = fmt.structural_tag(tools) if tools is not None and tools.choice != "none" else None
    if grammar is not None:
        names["structured_output"] = "tools"
    with pipe.refusals(variant, names):
        params = [body.to_sampling_params(room, c, grammar) for c in range(body.n)]
    job = Job(variant, engine, [ids] * body.n, params, prefix, names, pipe.cache_salt(request, body.cache_salt))
    answer_tools = ToolAnswer(fmt, calls_only=tools.choice != "auto") if grammar is not None and tools else None
    return ChatJob(job, answer_tools)
