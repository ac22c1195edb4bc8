"""The cheap checks of structured-output specs (service.api.schema_checks) directly: the depth scan
against counts made by hand, and no recursion whatever the depth of text or dict."""
from __future__ import annotations

import json

import pytest

from service.api.limits import MAX_SCHEMA_DEPTH
from service.api.schema_checks import check_schema, parse_schema, text_depth
from service.engine import RequestError
from tests.service.hostile_schemas import nested_text


def nested_dict(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


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


def test_the_live_tests_use_the_tables_values():
    from service.api import limits
    from tests.service.api import test_api_schema_limits as live
    for name in ("MAX_SCHEMA_BYTES", "MAX_SCHEMA_DEPTH", "MAX_SCHEMA_PROPERTIES", "MAX_ENUM_ENTRIES", "MAX_PATTERN_CHARS"):
        assert getattr(live, name) == getattr(limits, name), name
