"""`POST /v1/responses`: OpenAI's Responses API, stateless, on top of the chat path.

The body becomes a chat request (service.api.protocol_responses) and runs as one (n = 1): same
template, tools and grammars. The answer is a `response` object whose `output` holds a `message`
item (its `output_text`) and/or `function_call` items; `status` is `incomplete` with
`incomplete_details.reason: max_output_tokens` when the budget cut it. Streaming sends the event
types the openai SDK reads (`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta` / `.done`, `response.content_part.done`,
`response.function_call_arguments.delta` / `.done`, `response.output_item.done`, then
`response.completed` or `response.incomplete` with the whole response), each with its
`sequence_number`.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.requests import Request

from service.api.chat_job import chat_job
from service.api.pipeline import Pipeline
from service.api.protocol_responses import FunctionCallItem, MessageItem, OutputText, ResponsesRequest, usage
from service.api.protocol_tools import ToolCall
from service.api.sse import EventStream
from service.engine.outputs import RequestOutput

NAMES = {"prompt": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
         "messages": "input"}


class ResponseAnswer:
    """One response's fields, and its events as the engine's outputs arrive."""

    def __init__(self, body: ResponsesRequest, model_id: str):
        self.body, self.model_id = body, model_id
        self.id = f"resp_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.seq = 0

    def response(self, status: str, output: list, outs: list[RequestOutput] | None) -> dict[str, Any]:
        b = self.body
        last = outs[-1] if outs else None
        finish = last.finish_reason if last else None
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model_id,
            "output": [o.model_dump() for o in output], "instructions": b.instructions, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "max_output_tokens": b.max_output_tokens, "temperature": b.temperature, "top_p": b.top_p,
            "parallel_tool_calls": b.parallel_tool_calls,
            "tool_choice": b.tool_choice.model_dump() if b.tool_choice is not None and not isinstance(b.tool_choice, str)
            else b.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or []], "text": {"format": fmt},
            "store": False, "previous_response_id": None, "background": False, "truncation": "disabled",
            "metadata": b.metadata or {},
            "usage": usage(last.prompt_tokens, last.completion_tokens, last.num_cached_tokens) if last else None,
        }

    @staticmethod
    def status(outs: list[RequestOutput]) -> str:
        return "incomplete" if outs[-1].finish_reason == "length" else "completed"

    def items(self, content: str | None, calls: list[ToolCall] | None, status: str) -> list:
        output: list = []
        if content:
            output.append(MessageItem(id=f"msg_{uuid.uuid4().hex[:24]}", status=status, content=[OutputText(text=content)]))
        output += [FunctionCallItem.of(c) for c in calls or []]
        return output

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

    async def stream(self, events: AsyncIterator[tuple[int, RequestOutput]], work_tools) -> AsyncIterator[bytes]:
        yield self.event("response.created", response=self.response("in_progress", [], None))
        yield self.event("response.in_progress", response=self.response("in_progress", [], None))
        tool_stream = work_tools.stream() if work_tools is not None else None
        outs: list[RequestOutput] = []
        output: list = []
        message: MessageItem | None = None

        def close_message() -> list[bytes]:
            nonlocal message
            if message is None:
                return []
            text, index, m = message.content[0].text, len(output) - 1, message
            message = None
            m.status = "completed"
            part = OutputText(text=text).model_dump()
            return [self.event("response.output_text.done", item_id=m.id, output_index=index, content_index=0,
                               text=text, logprobs=[]),
                    self.event("response.content_part.done", item_id=m.id, output_index=index, content_index=0, part=part),
                    self.event("response.output_item.done", output_index=index, item=m.model_dump())]

        async for _, out in events:
            outs.append(out)
            content, deltas = out.new_text, []
            if tool_stream is not None:
                content, deltas = tool_stream.push(out.new_text)
                if out.finished:
                    content += tool_stream.finish()
            if content:
                if message is None:
                    message = MessageItem(id=f"msg_{uuid.uuid4().hex[:24]}", status="in_progress",
                                          content=[OutputText(text="")])
                    output.append(message)
                    yield self.event("response.output_item.added", output_index=len(output) - 1, item=message.model_dump())
                    yield self.event("response.content_part.added", item_id=message.id, output_index=len(output) - 1,
                                     content_index=0, part=OutputText(text="").model_dump())
                message.content[0].text += content
                yield self.event("response.output_text.delta", item_id=message.id, output_index=len(output) - 1,
                                 content_index=0, delta=content, logprobs=[])
            for delta in deltas:
                if delta.id is None:
                    continue  # the arguments come with the call's first delta below
                for chunk in close_message():
                    yield chunk
                arguments = next(d.function.arguments for d in deltas if d.index == delta.index and d.id is None)
                item = FunctionCallItem.of(ToolCall.model_validate({"id": delta.id, "function": {
                    "name": delta.function.name, "arguments": arguments}}))
                output.append(item)
                index = len(output) - 1
                yield self.event("response.output_item.added", output_index=index,
                                 item=item.model_copy(update={"arguments": "", "status": "in_progress"}).model_dump())
                yield self.event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                                 delta=arguments)
                yield self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                 name=item.name, arguments=arguments)
                yield self.event("response.output_item.done", output_index=index, item=item.model_dump())
        for chunk in close_message():
            yield chunk
        status = self.status(outs)
        yield self.event(f"response.{status}", response=self.response(status, output, outs))


def register_responses_routes(app: FastAPI, pipe: Pipeline) -> None:
    state = pipe.state

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        body = await pipe.read(request, ResponsesRequest)
        variant, _ = pipe.route(body.model)
        with pipe.refusals(variant, NAMES):
            chat = body.chat_request()
        work = await chat_job(pipe, request, chat, dict(NAMES), prefix="resp")
        model_id = body.model or state.model_ids()[0]
        answer = ResponseAnswer(body, model_id)
        if body.stream:
            gen = await pipe.start(request, work.job)
            return EventStream(answer.stream(gen.events(), work.tools), gen.close, keep_alive_s=state.sse_keep_alive_s)
        outputs, _ = await pipe.complete(request, work.job)
        outs = outputs[0]
        text = "".join(o.new_text for o in outs)
        content, calls = work.tools.message(text) if work.tools is not None else (text, None)
        status = answer.status(outs)
        return await pipe.json(len(outs), lambda: answer.response(status, answer.items(content, calls, status), outs))
