"""Tool calls out of a chat choice's text: whole (a JSON answer) or as it streams (SSE deltas).

`ToolAnswer.message` splits a finished text into `content` (None when only calls were made) and
`tool_calls`. `ToolStream` does it on the fly: text that cannot be part of a call is content at
once; text that may begin one (a prefix of the format's trigger) is held until it is ruled out;
a call is delivered when it is complete, as OpenAI streams one: a delta with its index, id, type
and name (arguments ""), then one with its arguments. With `calls_only` (tool_choice required or
a named function) the whitespace between calls is not content. No FastAPI here.
"""
from __future__ import annotations

from dataclasses import dataclass

from service.api.protocol_tools import FunctionCallDelta, ToolCall, ToolCallDelta
from service.api.tool_calls import ToolFormat, new_call_id, tool_calls


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    fmt: ToolFormat
    calls_only: bool   # tool_choice required or named: the grammar allows nothing but calls

    def message(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        content, calls = self.fmt.parse(text)
        if not calls:
            return text, None
        content = content.strip()
        return (content or None) if not self.calls_only else None, tool_calls(calls)

    def stream(self) -> ToolStream:
        return ToolStream(self.fmt, self.calls_only)


@dataclass(slots=True)
class ToolStream:
    fmt: ToolFormat
    calls_only: bool
    held: str = ""
    num_calls: int = 0

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content to send now, tool-call deltas to send now) after `text`."""
        self.held += text
        content, deltas = [], []
        trigger = self.fmt.trigger
        while True:
            start = self.held.find(trigger)
            if start < 0:
                keep = next((k for k in range(min(len(trigger) - 1, len(self.held)), 0, -1)
                             if trigger.startswith(self.held[-k:])), 0)
                content.append(self.held[:len(self.held) - keep])
                self.held = self.held[len(self.held) - keep:]
                break
            content.append(self.held[:start])
            self.held = self.held[start:]
            end = self.fmt._call_end(self.held, 0)
            if end is None:
                break  # the call is not complete yet
            (name, arguments), self.held = end[1], self.held[end[0]:]
            deltas += [ToolCallDelta(index=self.num_calls, id=new_call_id(), type="function",
                                     function=FunctionCallDelta(name=name, arguments="")),
                       ToolCallDelta(index=self.num_calls, function=FunctionCallDelta(arguments=arguments))]
            self.num_calls += 1
        return self._content("".join(content)), deltas

    def finish(self) -> str:
        """What is still held, as content (an unfinished call stays text), at the end of the choice."""
        rest, self.held = self.held, ""
        return self._content(rest)

    def _content(self, text: str) -> str:
        if text.isspace() and (self.calls_only or self.num_calls):
            return ""
        return "" if self.calls_only else text
