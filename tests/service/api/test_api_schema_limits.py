"""Structured-output specs beyond the limits table are 400s naming the field and the limit, before
anything compiles; a schema nested however deep is a 400, never a 500 or a RecursionError (issue 21).
Against the shared live tiny server; the checks themselves (service.api.schema_checks) also
directly, on values an independent count gives.
"""
from __future__ import annotations

import json

import httpx
import pytest

from service.api.limits import MAX_ENUM_ENTRIES, MAX_PATTERN_CHARS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_PROPERTIES
from service.api.schema_checks import check_schema, parse_schema, text_depth
from service.engine import RequestError
from tests.service.live_server import AUTH


def nested_text(levels: int) -> str:
    """An object schema `levels` objects deep, as JSON text built without recursion (2 JSON levels each)."""
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels


def nested_dict(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.fixture(scope="module")
def http(shared_server):
    with httpx.Client(base_url=shared_server.base_url, timeout=120, headers=AUTH) as client:
        yield client


def refused(http: httpx.Client, field: str, value, path: str = "/v1/completions") -> dict:
    r = http.post(path, json={"prompt": "x", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text[:300]
    return r.json()["error"]


@pytest.mark.parametrize("levels", [150, 600, 5000])
def test_a_deeply_nested_guided_json_string_is_a_400(http, shared_server, levels):
    error = refused(http, "guided_json", nested_text(levels))
    assert error["param"] == "guided_json"
    assert f"nested more than {MAX_SCHEMA_DEPTH} levels deep" in error["message"]
    assert "recursion" not in error["message"]
    assert "RecursionError" not in shared_server.log and "Traceback" not in shared_server.log


def test_the_same_schema_within_the_depth_is_compiled(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_json": nested_text(20)})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value,words", [
    ("guided_json", {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)}},
     [f"more than {MAX_SCHEMA_PROPERTIES:,} properties"]),
    ("guided_json", {"type": "string", "description": "g" * MAX_SCHEMA_BYTES}, [f"{MAX_SCHEMA_BYTES:,} are accepted"]),
    ("guided_json", {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_PROPERTIES + 1)}},
     [f"more than {MAX_SCHEMA_PROPERTIES:,} properties"]),
    ("guided_json", {"enum": list(range(MAX_ENUM_ENTRIES + 1))}, [f"more than {MAX_ENUM_ENTRIES:,} enum values"]),
    ("guided_json", {"type": "string", "pattern": "a" * (MAX_PATTERN_CHARS + 1)}, [f"at most {MAX_PATTERN_CHARS:,}"]),
    ("guided_regex", "b" * (MAX_PATTERN_CHARS + 1), [f"{MAX_PATTERN_CHARS + 1:,} characters", f"{MAX_PATTERN_CHARS:,}"]),
    ("guided_choice", [f"c{i}" for i in range(20_000)], [f"at most {MAX_ENUM_ENTRIES:,}"]),
    ("guided_grammar", 'root ::= "' + "d" * MAX_SCHEMA_BYTES + '"', [f"at most {MAX_SCHEMA_BYTES:,}"]),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "e", "schema": {"enum": [str(i) for i in range(50_000)]}}},
     ["enum values"]),
    ("structured_outputs", {"choice": [str(i) for i in range(MAX_ENUM_ENTRIES + 1)]}, ["choices"]),
])
def test_each_limit_is_a_400_naming_the_field_and_the_limit(http, field, value, words):
    error = refused(http, field, value)
    param = {"response_format": "response_format.json_schema.schema",
             "structured_outputs": "structured_outputs.choice"}.get(field, field)
    assert error["param"] == param and error["message"].startswith(param)
    for word in words:
        assert word in error["message"], error["message"]


def test_tgi_grammar_values_are_checked_too(http):
    r = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex",
                                                                               "value": "f" * (MAX_PATTERN_CHARS + 1)}}})
    assert r.status_code == 400 and "parameters.grammar.value" in r.json()["error"], r.text
    r = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "json",
                                                                               "value": nested_text(300)}}})
    assert r.status_code == 400 and "levels deep" in r.json()["error"], r.text


def test_the_depth_scan_skips_strings_and_counts_every_bracket():
    assert text_depth('{"a": "[[[{{{", "b": [1, [2, {"c": "\\"]]]"}]]}') == 4
    assert text_depth(nested_text(600)) == 1201 == 2 * 600 + 1
    assert text_depth("[]") == 1 and text_depth('"{"') == 0


def test_the_checks_never_recurse():
    with pytest.raises(RequestError, match="levels deep"):
        parse_schema(nested_text(100_000), "guided_json")  # past the byte limit first, never parsed
    with pytest.raises(RequestError, match="levels deep"):
        check_schema(nested_dict(50_000), "guided_json")    # a dict deeper than json.dumps could encode
    limit = MAX_SCHEMA_DEPTH // 2 - 1  # objects: 2 levels each, plus the innermost
    assert json.loads(check_schema(nested_dict(limit), "x")) == nested_dict(limit)
    with pytest.raises(RequestError):
        check_schema(nested_dict(limit + 1), "x")
