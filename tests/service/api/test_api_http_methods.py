"""HTTP findings of issue 21, against the shared live tiny server (API key on): a trailing slash is never
redirected (Starlette built the Location from the Host header, before the key check), HEAD answers
wherever GET does, and the page carries a strict Content-Security-Policy that allows exactly its own
inline script and style (hashes computed here from the page) and X-Frame-Options: DENY.
"""
from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest

from tests.service.live_server import AUTH


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.mark.parametrize("path", ["/v1/completions/", "/v1/chat/completions/", "/generate/", "/tokenize/"])
def test_a_trailing_slash_is_a_404_never_a_redirect_to_the_host_header(server, path):
    for headers in ({"Host": "evil.example"}, {"Host": "evil.example", **AUTH}):
        r = httpx.post(server.url(path), headers=headers, json={"prompt": "x"}, follow_redirects=False)
        assert r.status_code == 404, (r.status_code, r.headers.get("location"))
        assert "location" not in r.headers and "evil.example" not in r.text


@pytest.mark.parametrize("path,headers", [("/", {}), ("/health", {}), ("/metrics", {}), ("/stats", {}),
                                          ("/v1/models", AUTH)])
def test_head_answers_wherever_get_does_without_a_body(server, path, headers):
    get = httpx.get(server.url(path), headers=headers)
    head = httpx.head(server.url(path), headers=headers)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path in ("/", "/v1/models", "/health"):  # the same body each time: the same length
        assert int(head.headers["content-length"]) == len(get.content)


def test_head_keeps_the_key_check_and_unknown_routes(server):
    assert httpx.head(server.url("/v1/models")).status_code == 401
    assert httpx.head(server.url("/nope")).status_code == 404
    assert httpx.head(server.url("/v1/completions")).status_code == 405  # POST only


def sha256_source(block: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


def test_the_page_sends_a_strict_csp_matching_its_inline_code(server):
    r = httpx.get(server.url("/"))
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self'" and policy["base-uri"] == "'none'"
    html = r.text
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert scripts and styles
    assert policy["script-src"].split() == [sha256_source(s) for s in scripts]
    assert policy["style-src"].split() == [sha256_source(s) for s in styles]
    assert "unsafe" not in r.headers["content-security-policy"]
    # what such a policy blocks must not be on the page: style attributes, inline handlers, javascript: URLs
    assert not re.search(r"\sstyle=|\son[a-z]+=|javascript:", html)
    assert httpx.head(server.url("/")).headers["content-security-policy"] == r.headers["content-security-policy"]
