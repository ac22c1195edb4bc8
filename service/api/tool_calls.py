"""How tool calls look in the model's text, for templates that do not render tools themselves.

A format (`--tool-call-parser`) says how a call is written, how the declared functions are told to
the model, and how calls in the generated text become OpenAI `tool_calls`:

- `hermes` (default; Hermes / Qwen style): the system turn lists the functions as JSON inside
  `<tools></tools>`, and a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
  tool results go back as `tool` messages whose content is wrapped in `<tool_response>`.
- `llama3_json` (Llama 3.1 style): a call is the bare object `{"name": ..., "parameters": {...}}`.

A checkpoint whose chat template renders `tools` itself (its source uses the variable) gets the
request's tools, assistant `tool_calls` and tool messages as transformers passes them; the format
still parses the output. The grammar (xgrammar's structural tags, service.engine.structured_output)
enforces the choice: `required` / a named function: only calls, each `{"name": one declared name,
"arguments": JSON matching its parameters}`; `auto`: free text, constrained from the moment a call
begins; `parallel_tool_calls: false` allows one call. `none` adds no grammar and parses nothing.
Arguments never carry properties their schema does not name (xgrammar's JSON is its strict mode),
so a function's `strict: true` holds, and holds without it too.
No FastAPI here.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.sampling_params import StructuredOutput
from service.api.protocol_tools import FunctionDef, ToolCall, ToolRequest

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
LLAMA_SYSTEM = (
    "You have access to the following functions:\n{tools}\n\nTo call a function, respond only with a JSON object "
    "of the form {{\"name\": function name, \"parameters\": dictionary of argument name and its value}}.")


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    trigger: str          # where a call begins in the text
    opener: str           # what a call writes before its JSON object (the trigger, or nothing)
    json_start: int       # offset of the call's JSON object from the trigger
    close: str            # what follows the JSON object
    args_key: str         # "arguments" or "parameters"
    system: str           # the instructions, `{tools}` the functions as JSON, one per line
    separator: str        # between parallel calls

    def call_text(self, name: str, arguments: Any) -> str:
        obj = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        return self.opener + obj + self.close

    def structural_tag(self, tools: ToolRequest) -> StructuredOutput:
        """The grammar of the answer under `tools.choice` (not for "none")."""
        tags = [{"type": "tag", "begin": f'{self.opener}{{"name": "{f.name}", "{self.args_key}": ',
                 "content": {"type": "json_schema", "json_schema": f.parameters or {"type": "object"},
                             "max_whitespace_cnt": 1},
                 "end": "}" + self.close} for f in tools.chosen()]
        if tools.choice == "auto":
            body: dict[str, Any] = {"type": "triggered_tags", "triggers": [self.trigger], "tags": tags,
                                    "stop_after_first": not tools.parallel}
        else:
            body = {"type": "tags_with_separator", "tags": tags, "separator": self.separator, "at_least_one": True,
                    "stop_after_first": not tools.parallel or tools.named is not None}
        return StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": body}))

    def parse(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """(the text outside calls, [(name, arguments as JSON text)]); an unfinished call stays text."""
        content: list[str] = []
        calls: list[tuple[str, str]] = []
        pos = 0
        while True:
            start = text.find(self.trigger, pos)
            end = self._call_end(text, start) if start >= 0 else None
            if end is None:
                content.append(text[pos:])
                return "".join(content), calls
            content.append(text[pos:start])
            calls.append(end[1])
            pos = end[0]

    def _call_end(self, text: str, start: int) -> tuple[int, tuple[str, str]] | None:
        """(where the call that begins at `start` ends, (name, arguments)), or None if it is not one."""
        i = start + self.json_start
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            obj, i = json.JSONDecoder().raw_decode(text, i)
        except ValueError:
            return None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get(self.args_key), dict)):
            return None
        close = self.close.strip()
        rest = text[i:].lstrip() if close else text[i:]
        if not rest.startswith(close):
            return None
        end = len(text) - len(rest) + len(close)
        return end, (obj["name"], json.dumps(obj[self.args_key], ensure_ascii=False))


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "<tool_call>\n", len("<tool_call>"), "\n</tool_call>", "arguments",
                         HERMES_SYSTEM, "\n"),
    "llama3_json": ToolFormat("llama3_json", '{"name": ', "", 0, "", "parameters", LLAMA_SYSTEM, "\n"),
}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(calls: Sequence[tuple[str, str]]) -> list[ToolCall]:
    return [ToolCall.model_validate({"id": new_call_id(), "function": {"name": n, "arguments": a}}) for n, a in calls]


def _function_json(f: FunctionDef) -> dict[str, Any]:
    return {"type": "function", "function": f.model_dump(exclude_none=True)}


def template_messages(messages: Sequence[Mapping[str, Any]], tools: ToolRequest | None, fmt: ToolFormat,
                      native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages (and extra template variables) to render: with `native` (the template renders
    tools) as transformers passes them; otherwise in `fmt`, its instructions in the system turn."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        call_id = m.pop("tool_call_id", None)
        if native:
            if calls:
                m["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}} for c in calls]
            if call_id is not None:
                m["tool_call_id"] = call_id
        else:
            if calls:
                texts = [fmt.call_text(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in calls]
                m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + texts)
            if m["role"] == "tool":
                m["content"] = f"<tool_response>\n{m.get('content', '')}\n</tool_response>"
        out.append(m)
    if tools is None:
        return out, {}
    if native:
        return out, {"tools": [_function_json(f) for f in tools.functions]}
    listing = fmt.system.format(tools="\n".join(json.dumps(_function_json(f), ensure_ascii=False) for f in tools.functions))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}" if out[0].get("content") else listing}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out, {}


def _arguments(text: str) -> Any:
    """An earlier call's arguments (JSON text) as the object templates expect; text if not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text
