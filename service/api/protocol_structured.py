"""Structured output as the clients ask for it, turned into one StructuredOutput.

OpenAI's `response_format` (text, json_object, json_schema with `strict`; also TGI's grammar shape
{type: json_object | json | regex, value}, as huggingface_hub sends it), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and their newer form `structured_outputs`
({json | regex | choice | grammar | json_object}); TGI's `grammar` ({type: json | json_schema |
regex, value}) is in protocol_native. At most one may be given; each is checked against the limits
(service.api.schema_checks) before the engine compiles it (an invalid schema, regex or grammar, or
one beyond a limit or the compile budget, is a 400 naming the field it came in). No FastAPI here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from model.sampling_params import StructuredOutput
from service.api.protocol import RequestBody
from service.api.schema_checks import check_choices, check_regex, check_schema, check_size, parse_schema
from service.engine.errors import RequestError


class JsonSchemaSpec(RequestBody):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's {type: text | json_object | json_schema, json_schema}, or TGI's grammar shape
    {type: json_object | json | regex, value} (what huggingface_hub's chat_completion sends)."""
    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: JsonSchemaSpec | None = None
    value: str | dict[str, Any] | None = None

    def tgi_spec(self) -> tuple[StructuredOutput, str] | None:
        """TGI's shape as a spec and its field; None for OpenAI's; RequestError when it is incomplete."""
        if self.value is None:
            if self.type in ("json", "regex"):
                raise RequestError(f"response_format: type {self.type} needs a value (TGI's grammar shape: a "
                                   f"{'JSON schema' if self.type == 'json' else 'regular expression'})",
                                   "response_format.value")
            return None
        if self.type in ("text", "json_schema"):
            raise RequestError(f"response_format.value is TGI's grammar field: type must be json_object, json or "
                               f"regex with it, not {self.type}", "response_format.value")
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise RequestError("response_format.value: type regex needs a string", "response_format.value")
            return StructuredOutput("regex", self.value), "response_format.value"
        return json_spec(self.value, "response_format.value"), "response_format.value"


class StructuredOutputsSpec(RequestBody):
    """vLLM's `structured_outputs` object: exactly one of its constraints."""
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


def json_spec(schema: str | dict[str, Any], param: str, strict: bool = False) -> StructuredOutput:
    """A JSON-schema spec from a schema object or its JSON text (RequestError naming `param` if neither,
    or if it is beyond the limits: service.api.schema_checks)."""
    if isinstance(schema, str):
        schema = parse_schema(schema, param)
    if not isinstance(schema, dict):
        raise RequestError(f"{param}: a JSON schema must be an object", param)
    return StructuredOutput("json", check_schema(schema, param), strict=strict)


def regex_spec(pattern: str, param: str) -> StructuredOutput:
    check_regex(pattern, param)
    return StructuredOutput("regex", pattern)


def choice_spec(choices: list[str], param: str) -> StructuredOutput:
    check_choices(choices, param)
    return StructuredOutput.choice(choices)


def grammar_spec(grammar: str, param: str) -> StructuredOutput:
    check_size(grammar, param, "grammar")
    return StructuredOutput("grammar", grammar)


class StructuredFields(RequestBody):
    """The structured-output fields OpenAI's endpoints accept (mixed into both request bodies)."""
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputsSpec | None = None

    def structured_output(self) -> tuple[StructuredOutput | None, str | None]:
        """(the spec, the field it came in) or (None, None); RequestError for two at once or a bad one."""
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise RequestError(f"guided_decoding_backend={self.guided_decoding_backend!r} is not available: "
                               "use 'xgrammar' or 'auto' (or omit it)", "guided_decoding_backend")
        if self.guided_whitespace_pattern is not None:
            raise RequestError("guided_whitespace_pattern is not supported: JSON is generated compact "
                               "(', ' and ': '); omit it", "guided_whitespace_pattern")
        found: list[tuple[StructuredOutput, str]] = []
        fmt = self.response_format
        tgi = fmt.tgi_spec() if fmt is not None else None
        if tgi is not None:
            found.append(tgi)
        elif fmt is not None and fmt.type == "json_object":
            found.append((StructuredOutput("json_object"), "response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            spec = fmt.json_schema
            if spec is None or spec.schema_ is None:
                raise RequestError("response_format: type json_schema needs json_schema.schema (a JSON schema "
                                   "object)", "response_format.json_schema.schema")
            found.append((json_spec(spec.schema_, "response_format.json_schema.schema", bool(spec.strict)),
                          "response_format.json_schema.schema"))
        if self.guided_json is not None:
            found.append((json_spec(self.guided_json, "guided_json"), "guided_json"))
        if self.guided_regex is not None:
            found.append((regex_spec(self.guided_regex, "guided_regex"), "guided_regex"))
        if self.guided_choice is not None:
            found.append((choice_spec(self.guided_choice, "guided_choice"), "guided_choice"))
        if self.guided_grammar is not None:
            found.append((grammar_spec(self.guided_grammar, "guided_grammar"), "guided_grammar"))
        so = self.structured_outputs
        if so is not None:
            given = [name for name in ("json", "regex", "choice", "grammar") if getattr(so, name if name != "json" else "json_")
                     is not None] + (["json_object"] if so.json_object else [])
            if len(given) != 1:
                raise RequestError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                                   f"got {', '.join(given) or 'none'}", "structured_outputs")
            param = f"structured_outputs.{given[0]}"
            if so.json_ is not None:
                found.append((json_spec(so.json_, param), param))
            elif so.regex is not None:
                found.append((regex_spec(so.regex, param), param))
            elif so.choice is not None:
                found.append((choice_spec(so.choice, param), param))
            elif so.grammar is not None:
                found.append((grammar_spec(so.grammar, param), param))
            else:
                found.append((StructuredOutput("json_object"), param))
        if len(found) > 1:
            raise RequestError(f"give one structured-output constraint, not {len(found)}: "
                               f"{', '.join(p for _, p in found)}", found[1][1])
        return found[0] if found else (None, None)
