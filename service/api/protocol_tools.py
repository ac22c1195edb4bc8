"""OpenAI's tool-calling bodies: the request's `tools`, `tool_choice`, `parallel_tool_calls` and the
assistant messages' `tool_calls`; the answer's `message.tool_calls` and streamed `delta.tool_calls`.

`ToolFields.tool_request()` checks them together (a named choice must name a declared function,
names are unique, a choice other than none/auto needs tools) and gives the ToolRequest the
formats (service.api.tool_calls) work from. No FastAPI here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, field_validator, model_serializer

from service.api.protocol import RequestBody
from service.api.protocol_structured import json_spec
from service.engine.errors import RequestError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class FunctionDef(RequestBody):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not _NAME.match(v):
            raise ValueError(f"function name {v!r} must be 1 to 64 letters, digits, underscores or dashes")
        return v


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(RequestBody):
    name: str
    arguments: str   # JSON text, as OpenAI sends it


class ToolCallIn(RequestBody):
    """A tool call of an earlier assistant message."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """What a chat request asks of tools: its functions, the choice (none | auto | required | a
    function name), and whether several calls may come in one answer."""
    functions: list[FunctionDef]
    choice: str
    parallel: bool

    @property
    def named(self) -> str | None:
        return None if self.choice in ("none", "auto", "required") else self.choice

    def chosen(self) -> list[FunctionDef]:
        """The functions the answer may call."""
        return [f for f in self.functions if f.name == self.named] if self.named else self.functions


class ToolFields(RequestBody):
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_request(self) -> ToolRequest | None:
        """None without tools; RequestError naming the field for a choice that cannot be met."""
        functions = [t.function for t in self.tools or []]
        choice = self.tool_choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if not functions:
            if choice not in (None, "none", "auto"):
                raise RequestError(f"tool_choice={name or choice!r} needs tools: declare the functions in tools",
                                   "tool_choice")
            return None
        names = [f.name for f in functions]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise RequestError(f"tools: function name {dup!r} is declared twice", "tools")
        if name is not None and name not in names:
            raise RequestError(f"tool_choice names function {name!r}, which tools do not declare "
                               f"(declared: {', '.join(names)})", "tool_choice")
        for i, f in enumerate(functions):
            if f.parameters is not None:
                json_spec(f.parameters, f"tools.{i}.function.parameters")  # an object, or a 400
        return ToolRequest(functions, name or (choice if isinstance(choice, str) else "auto"), self.parallel_tool_calls)


# ---- answers ----

class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(BaseModel):
    """One streamed piece of a tool call: the first carries id, type and name, the next the arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}
