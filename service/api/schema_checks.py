"""Cheap checks of a structured-output spec before anything compiles it, from service.api.limits' table.

A compile is bounded by its budget (service.engine.grammar_workers); these refuse in microseconds
what is plainly too big: the spec's size in bytes, a schema's nesting depth, its property
definitions and enum values, a choice list's entries, a regex's length. Each is a RequestError
(400) naming the field and the limit. Nothing here recurses: JSON text is parsed only once a
non-recursive scan has seen its nesting within MAX_SCHEMA_DEPTH, and a parsed schema is walked
with an explicit stack, so no RecursionError can come out of a schema however deep. No FastAPI here.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from service.api.limits import MAX_ENUM_ENTRIES, MAX_PATTERN_CHARS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_PROPERTIES
from service.engine.errors import RequestError

# a JSON string (skipped whole, escapes included) or one bracket; anything else is not nesting
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def check_size(text: str, param: str, what: str = "schema") -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise RequestError(f"{param}: the {what} is {size:,} bytes; at most {MAX_SCHEMA_BYTES:,} are accepted", param)


def text_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, strings skipped (a scan, no recursion)."""
    depth = deepest = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        c = match.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _too_deep(param: str) -> RequestError:
    return RequestError(f"{param}: the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep; at most "
                        f"{MAX_SCHEMA_DEPTH} are accepted (an object property takes 2)", param)


def parse_schema(text: str, param: str) -> Any:
    """A schema's JSON text parsed, after its nesting and size were checked (RequestError beyond them)."""
    if text_depth(text) > MAX_SCHEMA_DEPTH:
        raise _too_deep(param)
    check_size(text, param)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RequestError(f"{param}: the schema is not valid JSON: {exc}", param) from None


def check_schema(schema: Any, param: str) -> str:
    """The schema's compact JSON text, once its depth, properties, enum values, patterns and size are
    within the limits (RequestError naming the first one beyond)."""
    properties = enums = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise _too_deep(param)
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
            continue
        if isinstance(node.get("properties"), dict):
            properties += len(node["properties"])
        if isinstance(node.get("enum"), list):
            enums += len(node["enum"])
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            check_regex(pattern, param, "a pattern")
        if properties > MAX_SCHEMA_PROPERTIES:
            raise RequestError(f"{param}: the schema defines more than {MAX_SCHEMA_PROPERTIES:,} properties; at most "
                               f"{MAX_SCHEMA_PROPERTIES:,} are accepted", param)
        if enums > MAX_ENUM_ENTRIES:
            raise RequestError(f"{param}: the schema has more than {MAX_ENUM_ENTRIES:,} enum values; at most "
                               f"{MAX_ENUM_ENTRIES:,} are accepted", param)
        stack.extend((value, depth + 1) for value in node.values())
    text = json.dumps(schema)
    check_size(text, param)
    return text


def check_regex(pattern: str, param: str, what: str = "the regex") -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RequestError(f"{param}: {what} has {len(pattern):,} characters; at most {MAX_PATTERN_CHARS:,} are "
                           "accepted", param)


def check_choices(choices: Sequence[str], param: str) -> None:
    if len(choices) > MAX_ENUM_ENTRIES:
        raise RequestError(f"{param}: {len(choices):,} choices; at most {MAX_ENUM_ENTRIES:,} are accepted", param)
    check_size(json.dumps(list(choices)), param, "choice list")
