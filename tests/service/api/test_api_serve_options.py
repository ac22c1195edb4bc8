"""`kvserve serve`'s API options on live servers: CORS (`--allowed-origins`: preflights answered
for the origins named, not for others; off by default), `--served-model-name` (the ids clients see
and route by), `--chat-template FILE` (it renders the prompt, a message's `name` included; a bad file is a
one-line error, exit 2), and real `curl` driving a completion and a stream."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.service.live_server import AUTH, REPO, LiveServer, read_sse

ORIGIN = "https://app.example"
TEMPLATE = ("{%- for m in messages %}[{{ m['role'] | upper }}{% if m.name %} {{ m.name }}{% endif %}] "
            "{{ m['content'] }}\n{% endfor %}{%- if add_generation_prompt %}[ASSISTANT] {% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi", "name": "ada"}]


@pytest.fixture(scope="module")
def custom_server(tmp_path_factory):
    """One server with all three options set (one start-up for the tests that need them)."""
    template = tmp_path_factory.mktemp("template") / "template.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    with LiveServer("--served-model-name", "smol", "--chat-template", str(template), "--allowed-origins",
                    f"{ORIGIN},http://localhost:3000", "--kv-cache-memory", "1MiB") as server:
        yield server


def preflight(server: LiveServer, origin: str) -> httpx.Response:
    return httpx.options(server.url("/v1/chat/completions"), timeout=60, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


# ---- CORS ----

def test_preflight_is_answered_for_an_allowed_origin_only(custom_server):
    r = preflight(custom_server, ORIGIN)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")} >= {"authorization",
                                                                                                  "content-type"}
    other = preflight(custom_server, "https://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_answers_carry_the_allow_origin_header_for_allowed_origins_only(custom_server):
    body = {"prompt": "x", "max_tokens": 1}
    allowed = httpx.post(custom_server.url("/v1/completions"), json=body, headers={"Origin": ORIGIN}, timeout=60)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.headers["access-control-expose-headers"] == "*"  # X-Request-Id readable by the page
    other = httpx.post(custom_server.url("/v1/completions"), json=body, headers={"Origin": "https://evil.example"},
                       timeout=60)
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(shared_server):
    r = preflight(shared_server, ORIGIN)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    models = httpx.get(shared_server.url("/v1/models"), headers={**AUTH, "Origin": ORIGIN}, timeout=60)
    assert models.status_code == 200 and "access-control-allow-origin" not in models.headers


# ---- --served-model-name ----

def test_the_served_model_name_is_what_clients_see_and_route_by(custom_server):
    http = httpx.Client(base_url=custom_server.base_url, timeout=60)
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["smol:native"]
    assert http.get("/v1/models/smol:native").json()["id"] == "smol:native"
    assert http.get("/v1/models/tiny:native").status_code == 404
    for model in ("smol", "smol:native"):
        r = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == model
    unknown = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert unknown.status_code == 404 and "smol:native" in unknown.json()["error"]["message"]
    assert custom_server.metric("kvserve_model_info", model_name="smol") == 1
    http.close()


# ---- --chat-template FILE ----

def test_the_chat_template_file_renders_the_prompt(custom_server, shared_server, tiny_ref):
    expected = tiny_ref.tokenizer.encode("[SYSTEM] Be brief.\n[USER ada] hi\n[ASSISTANT] ", add_special_tokens=False)
    r = httpx.post(custom_server.url("/tokenize"), json={"messages": MESSAGES}, timeout=60)
    assert r.status_code == 200 and r.json()["tokens"] == expected
    default = httpx.post(shared_server.url("/tokenize"), json={"messages": MESSAGES}, headers=AUTH, timeout=60)
    assert default.json()["tokens"] == tiny_ref.chat_ids(MESSAGES) != expected  # the checkpoint's ChatML
    chat = httpx.post(custom_server.url("/v1/chat/completions"), timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 2, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("content, needle", [
    (None, "No such file"),                               # the file is missing
    ("{% for m in messages %}{{ m['content'] }}", "--chat-template"),  # Jinja that does not compile
])
def test_a_bad_chat_template_file_is_a_one_line_error_exit_2(tmp_path, content, needle):
    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model", "tiny", "--dtype", "float32",
                           "--port", "0", "--chat-template", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvserve serve: error: --chat-template {path}"), done.stderr
    assert needle in lines[0]


# ---- curl ----

def curl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed")
    return subprocess.run([exe, "-sS", "--fail-with-body", "-H", f"Authorization: {AUTH['Authorization']}",
                           "-H", "Content-Type: application/json", *args], capture_output=True, text=True, timeout=120)


def test_curl_completion_and_stream(shared_server, tiny_ref):
    body = {"model": "tiny", "prompt": "curl says", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = tiny_ref.text(tiny_ref.greedy(tiny_ref.encode("curl says"), 6)[0])
    whole = curl("-d", json.dumps(body), shared_server.url("/v1/completions"))
    assert whole.returncode == 0, whole.stderr + whole.stdout
    answer = json.loads(whole.stdout)
    assert answer["choices"][0]["text"] == expected and answer["usage"]["completion_tokens"] == 6
    streamed = curl("-N", "-d", json.dumps({**body, "stream": True}), shared_server.url("/v1/completions"))
    assert streamed.returncode == 0, streamed.stderr + streamed.stdout
    events = [e for e in read_sse(streamed.stdout) if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == expected
    refused = curl("-d", json.dumps({**body, "max_tokens": 0}), shared_server.url("/v1/completions"))
    assert refused.returncode == 22 and json.loads(refused.stdout)["error"]["param"] == "max_tokens"
