"""Issue 21's schema and grammar attacks as request fields (field name, value), for the fuzz test, and
the slow schema of the compile-budget tests.

Built without recursion (deep ones as text), each at the size that took the server down before:
20,000 properties (plain and strict), a 50,000-string enum, 20,000 choices, an anyOf of 20 x 20 x 20
patterns, objects nested 150 / 600 / 5,000 levels, a pattern of minutes of compile, patterns and
grammars past the limits, invalid ones; and a few small valid ones among them.
"""
from __future__ import annotations

import json


def nested_text(levels: int) -> str:
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels


def _properties(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)},
            "required": [f"p{i}" for i in range(n)], "additionalProperties": False}


def _any_of_patterns(n: int = 20) -> dict:
    return {"anyOf": [{"anyOf": [{"anyOf": [{"type": "string", "pattern": f"^{i}-{j}-{k}[a-z]{{1,9}}$"}
                                            for k in range(n)]} for j in range(n)]} for i in range(n)]}


def slow_schema(tag: str = "") -> dict:
    """Passes every cheap check (eight 66-byte patterns) but compiles for minutes: xgrammar expands the
    bounded repetition of each, ~8 s per property on the tiny model's vocabulary. `tag` makes it distinct."""
    return {"type": "object", "properties": {
        k: {"type": "string", "pattern": f"^([a-z]{{1,20}}[0-9]{{1,20}}){{1,1000}}{k}{tag}$"} for k in "abcdefgh"}}


SLOW = slow_schema()
SMALL = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 4}}}


def hostile_fields() -> list[tuple[str, object]]:
    return [
        ("guided_json", _properties(20_000)),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                                    "schema": _properties(20_000)}}),
        ("guided_json", {"enum": [f"value-{i}" for i in range(50_000)]}),
        ("guided_choice", [f"choice {i}" for i in range(20_000)]),
        ("guided_json", _any_of_patterns()),
        ("guided_json", _any_of_patterns(6)),
        ("guided_json", nested_text(150)),
        ("guided_json", nested_text(600)),
        ("guided_json", nested_text(5_000)),
        ("structured_outputs", {"json": nested_text(990)}),
        ("guided_json", json.loads(nested_text(25))),
        ("guided_json", SLOW),
        ("guided_regex", "(a+)+$" * 300),
        ("guided_regex", "([a-z"),
        ("guided_grammar", 'root ::= "' + "x" * 200_000 + '"'),
        ("guided_grammar", "root ::= " + "(" * 3_000 + '"a"' + ")" * 3_000),
        ("guided_json", "{" * 100_000),
        ("guided_json", SMALL),
        ("guided_regex", "[a-z]{1,6}"),
        ("guided_choice", ["yes", "no"]),
    ]
