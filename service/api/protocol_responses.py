"""OpenAI's Responses API (`POST /v1/responses`), stateless: the request body, its translation into
the chat request kvserve runs, and the response object and its output items.

`input` is a string or a list of items: messages ({role, content: text or input_text / output_text
parts}), earlier `function_call`s and their `function_call_output`s; `instructions` become the
system turn; `text.format` (text | json_object | json_schema) and function `tools` map onto chat's
response_format and tools. Nothing is stored: `store: true`, `previous_response_id` and
`background: true` are refused (400). No FastAPI here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol import RequestBody
from service.api.protocol_openai import ChatCompletionRequest
from service.api.protocol_tools import ToolCall
from service.engine.errors import RequestError


class TextFormat(RequestBody):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(RequestBody):
    format: TextFormat | None = None


class FunctionTool(RequestBody):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(RequestBody):
    type: Literal["function"]
    name: str


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None

    def refusals(self) -> None:
        """What needs server-side state, which a stateless server cannot keep."""
        if self.store:
            raise RequestError("store=true is not supported: kvserve keeps no responses (stateless); send "
                               "store=false or omit it", "store")
        if self.previous_response_id is not None:
            raise RequestError("previous_response_id is not supported: kvserve keeps no responses (stateless); send "
                               "the earlier turns in input instead", "previous_response_id")
        if self.background:
            raise RequestError("background=true is not supported: responses are answered directly", "background")

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion (its errors name the Responses fields where they map)."""
        self.refusals()
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            if kind == "message":
                messages.append({"role": item.get("role"), "content": _text(item.get("content"), f"input.{i}.content")})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
                if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("content"):
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": output if isinstance(output, str) else _text(output, f"input.{i}.output")})
            else:
                raise RequestError(f"input.{i}.type={kind!r} is not supported: only message, function_call and "
                                   "function_call_output", f"input.{i}.type")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_completion_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                                "parallel_tool_calls": self.parallel_tool_calls, "user": self.user}
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                          "function": {"name": choice.name}}
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


def _text(content: Any, param: str) -> str:
    """A message's text: a string, or its input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{param}: only text is supported (a string, or input_text / output_text parts)", param)


# ---- answers ----

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []
    logprobs: list = []


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: str
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"

    @classmethod
    def of(cls, call: ToolCall) -> FunctionCallItem:
        return cls(id="fc_" + call.id.removeprefix("call_"), call_id=call.id, name=call.function.name,
                   arguments=call.function.arguments)


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}
