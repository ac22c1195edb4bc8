"""Structured-output specs beyond the limits table are 400s naming the field and the limit, before
anything compiles; a schema nested however deep is a 400, never a 500 or a RecursionError (issue 21).
Against the shared live tiny server (tests/service/api/test_schema_checks.py checks the checks directly).
"""
from __future__ import annotations

import httpx
import pytest

from tests.service.hostile_schemas import nested_text
from tests.service.live_server import AUTH

# the limits table's values (service.api.limits), written out: these tests also run against a
# server that predates them (and fail there: 200s, 500s, RecursionError messages)
MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_PROPERTIES, MAX_ENUM_ENTRIES, MAX_PATTERN_CHARS = 131_072, 64, 1000, 1000, 1000


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
