"""The bad-input corpus: what an attacker or a careless client sends (huge, negative and non-finite
numbers, wrong types, huge stop lists, bad seeds, empty messages, oversized text...), each against the
shared live tiny server. Every one must be a 4xx with OpenAI's error body, counted as a rejection,
never a 500; range errors name the field and the allowed range. The server stays healthy throughout.
Keep adding to it: every input that once broke something belongs here.
"""
from __future__ import annotations

import json

import httpx
import pytest

from service.api.limits import CHARS_PER_TOKEN_BOUND, MAX_CHOICES, Limits
from tests.service.live_server import AUTH, SHARED_MAX_MODEL_LEN

MSG = [{"role": "user", "content": "hi"}]
LIMITS = Limits()  # the shared server runs with the defaults
PROMPT_CHARS = CHARS_PER_TOKEN_BOUND * SHARED_MAX_MODEL_LEN
INF, NAN = float("inf"), float("nan")


def completions(**fields):
    return "/v1/completions", {"prompt": "x", "max_tokens": 2, **fields}


def chat(**fields):
    return "/v1/chat/completions", {"messages": MSG, "max_tokens": 2, **fields}


def generate(**parameters):
    return "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, **parameters}}


# (id, (path, body), status, param, a piece of the message); body bytes are sent as they are
CORPUS: list[tuple[str, tuple[str, object], int, str | None, str | None]] = []


def case(name, target, status=400, param=None, needle=None):
    CORPUS.append((name, target, status, param, needle))


# ---- non-finite and out-of-range numbers, on every endpoint's spelling of the field ----
for value in (INF, -INF, NAN, 1e400, -1, 101, 1e308):
    needle = "finite" if value != value or value in (INF, -INF) or value == 1e400 else "[0, 100]"
    case(f"temperature={value}", completions(temperature=value), param="temperature", needle=needle)
case("chat temperature=Infinity", chat(temperature=INF), param="temperature", needle="finite")
case("generate temperature=NaN", generate(temperature=NAN), param="parameters.temperature", needle="finite")
for value in (0, -0.1, 1.0001, NAN, INF):
    case(f"top_p={value}", completions(top_p=value), param="top_p", needle="(0, 1]")
for value in (10**12, -2, 260, 2**70):
    case(f"top_k={value}", completions(top_k=value), param="top_k", needle="-1, 0 (off) or in [1, ")
case("generate top_k=10**12", generate(top_k=10**12), param="parameters.top_k", needle="259")
for value in (-0.1, 1.5, NAN):
    case(f"min_p={value}", completions(min_p=value), param="min_p", needle="[0, 1]")
for value in (0, 1e-38, -1, 1e308, INF, 1e-44):
    case(f"repetition_penalty={value}", completions(repetition_penalty=value, temperature=1),
         param="repetition_penalty", needle="[0.01, 100]")
case("chat repetition_penalty=1e-38", chat(repetition_penalty=1e-38), param="repetition_penalty", needle="[0.01, 100]")
case("generate repetition_penalty=0", generate(repetition_penalty=0), param="parameters.repetition_penalty")
for field in ("presence_penalty", "frequency_penalty"):
    for value in (3, -2.5, NAN, -INF):
        case(f"{field}={value}", completions(**{field: value}), param=field, needle="[-2, 2]")
for value in (-1, 21, 10**9):
    case(f"logprobs={value}", completions(logprobs=value), param="logprobs", needle="[0, 20]")
case("chat top_logprobs=21", chat(logprobs=True, top_logprobs=21), param="top_logprobs", needle="[0, 20]")
case("generate top_n_tokens=50", generate(top_n_tokens=50), param="parameters.top_n_tokens", needle="[0, 20]")
for value in (0, -1, 17, 10**9):
    case(f"n={value}", completions(n=value), param="n", needle="[1, 16]")
case("chat n=100", chat(n=100), param="n", needle="[1, 16]")
for value in (0, -1):
    case(f"max_tokens={value}", completions(max_tokens=value), param="max_tokens")
for value in (2**63, 10**30):
    case(f"max_tokens={value}", completions(max_tokens=value), param="max_tokens", needle="max_model_len")
case("generate max_new_tokens=10**9", generate(max_new_tokens=10**9), param="parameters.max_new_tokens")

# ---- seeds outside 64 bits ----
case("seed=2**64", completions(seed=2**64), param="seed", needle="2**64 - 1")
case("seed=-2**63-1", completions(seed=-2**63 - 1), param="seed", needle="-2**63")
case("seed=10**30", completions(seed=10**30), param="seed")
case("seed=2**64-1 with n=2", completions(seed=2**64 - 1, n=2), param="seed", needle="n=2")
case("chat seed=2**64-2 with n=3", chat(seed=2**64 - 2, n=3), param="seed", needle="n=3")
case("generate seed=2**64", generate(seed=2**64), param="parameters.seed")

# ---- stop strings ----
case("5 stop strings", completions(stop=list("abcde")), param="stop", needle="at most 4")
case("100k stop strings", completions(stop=["zq"] * 100_000), param="stop", needle="at most 4")
case("long stop string", completions(stop=["z" * (LIMITS.max_stop_chars + 1)]), param="stop",
     needle=f"at most {LIMITS.max_stop_chars}")
case("empty stop string", completions(stop=[""]), param="stop")
case("generate 10 stop strings", generate(stop=["a"] * 10), param="parameters.stop", needle="at most 4")
case("chat stop of 300k characters", chat(stop="q" * 300_000), param="stop")
for value in ([-1], [10**12], [2**64]):
    case(f"stop_token_ids={value}", completions(stop_token_ids=value), param="stop_token_ids", needle="[0, 258]")

# ---- sizes before tokenizing, and the response budget ----
case("prompt past the character limit", completions(prompt="y" * (PROMPT_CHARS + 1)), param="prompt",
     needle=f"at most {PROMPT_CHARS:,}")
case("prompts past the character limit in all", completions(prompt=["y" * (PROMPT_CHARS // 2 + 1)] * 2),
     param="prompt", needle="characters")
case("chat content past the character limit", chat(messages=[{"role": "user", "content": "y" * (PROMPT_CHARS + 1)}]),
     param="messages", needle="characters")
case("generate inputs past the character limit", ("/generate", {"inputs": "y" * (PROMPT_CHARS + 1)}),
     param="inputs", needle="characters")
case("tokenize past the character limit", ("/tokenize", {"prompt": "y" * (PROMPT_CHARS + 1)}), param="prompt")
case("too many messages", chat(messages=MSG * (LIMITS.max_messages + 1)), param="messages",
     needle=f"at most {LIMITS.max_messages:,}")
case("100k messages", chat(messages=[{"role": "user", "content": ""}] * 100_000), param="messages")
case("tokenize too many messages", ("/tokenize", {"messages": MSG * (LIMITS.max_messages + 1)}), param="messages")
case("n x max_tokens x logprobs past the budget", completions(prompt=["a"] * 8, n=16, max_tokens=100, logprobs=20),
     param="max_tokens", needle="--max-response-tokens")
case("more choices than allowed", completions(prompt=["a"] * (MAX_CHOICES // 4 + 1), n=4), param="prompt",
     needle=str(MAX_CHOICES))

# ---- wrong types and shapes ----
for value in ("hot", [1], {}, None):
    if value is not None:
        case(f"temperature={value!r}", completions(temperature=value), status=400, param="temperature")
case("n=1.5", completions(n=1.5), status=400, param="n")
case("n=true", completions(n=True), status=400, param="n")
case("prompt=5", ("/v1/completions", {"prompt": 5}), param="prompt")
case("prompt=null", ("/v1/completions", {"prompt": None}), param="prompt")
case("prompt={}", ("/v1/completions", {"prompt": {}}), param="prompt")
case("prompt=[[]]", ("/v1/completions", {"prompt": [[]]}), param="prompt")
case("prompt=[1, 'a']", ("/v1/completions", {"prompt": [1, "a"]}), param="prompt")
case("prompt token 2**64", ("/v1/completions", {"prompt": [2**64]}), param="prompt")
case("messages='hi'", ("/v1/chat/completions", {"messages": "hi"}), status=400, param="messages")
case("messages=[1]", ("/v1/chat/completions", {"messages": [1]}), status=400, param="messages.0")
case("role=wizard", ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), status=400)
case("message without role", ("/v1/chat/completions", {"messages": [{}]}), status=400)
case("image content part", ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}))
case("stream='yes'", completions(stream="yes"), status=400, param="stream")
case("stop=5", completions(stop=5), status=400, param="stop")
case("stop=[5]", completions(stop=[5]), status=400)
case("stream_options=[]", completions(stream=True, stream_options=[]), status=400)
case("logit_bias", completions(logit_bias={"1": 100}), param="logit_bias")
case("generate parameters=[]", ("/generate", {"inputs": "x", "parameters": []}), status=400)
case("generate_stream empty inputs", ("/generate_stream", {"inputs": ""}), param="inputs")
case("model of 100k characters", completions(model="m" * 100_000), status=404, param="model")

# ---- empty things ----
case("empty prompt", ("/v1/completions", {"prompt": ""}), param="prompt")
case("empty prompt list", ("/v1/completions", {"prompt": []}), param="prompt")
case("empty messages", ("/v1/chat/completions", {"messages": []}), param="messages")
case("tokenize empty messages", ("/tokenize", {"messages": []}), param="messages")
case("tokenize nothing", ("/tokenize", {}), param="prompt")
case("empty inputs", ("/generate", {"inputs": ""}), param="inputs")
case("detokenize token -1", ("/detokenize", {"tokens": [-1]}), param="tokens")
case("detokenize token 10**30", ("/detokenize", {"tokens": [10**30]}), param="tokens")

# ---- bodies that are not a JSON object ----
for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b'{"prompt": "x"' * 1000):
    case(f"body {raw[:12]!r}", ("/v1/completions", raw), status=400)


# ---- text the tokenizer could not take: lone UTF-16 surrogates ----
for path, raw in (("/v1/completions", b'{"prompt": "\\ud800abc", "max_tokens": 2}'),
                  ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
                  ("/tokenize", b'{"prompt": "x\\udc00"}'),
                  ("/generate", b'{"inputs": "x", "parameters": {"stop": ["\\ud800"]}}')):
    case(f"lone surrogate {path}", (path, raw))

# ---- bodies that say they are not JSON ----
for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
    case(f"Content-Type {content_type}", ("/v1/completions", (content_type, b'{"prompt": "x", "max_tokens": 2}')),
         status=415)


def _ids():
    return [c[0][:60] for c in CORPUS]


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers=AUTH) as client:
        yield client


def rejected_total(server) -> float:
    return sum(v for (name, labels), v in server.metrics().items() if name == "kvserve_requests_rejected_total")


@pytest.mark.parametrize("name,target,status,param,needle", CORPUS, ids=_ids())
def test_bad_input_is_a_4xx_with_the_error_body_never_a_500(server, http, name, target, status, param, needle):
    path, body = target
    before = rejected_total(server)
    content_type, raw = body if isinstance(body, tuple) else ("application/json", body)
    if not isinstance(raw, bytes):
        raw = json.dumps(raw).encode()  # NaN and Infinity as JSON's common extensions
    r = http.post(path, content=raw, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    if path in ("/generate", "/generate_stream", "/"):  # TGI's error body names the field in its message
        tgi = r.json()
        assert set(tgi) == {"error", "error_type"} and tgi["error"] and tgi["error_type"]
        err = {"message": tgi["error"], "param": param if param is None or tgi["error"].startswith(param) else tgi}
    else:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert len(r.content) < 4096, "an error echoes at most a short piece of what was sent"
    if param is not None:
        assert err["param"] == param, err
    if needle is not None:
        assert needle in err["message"], err["message"]
    assert rejected_total(server) == before + 1


def test_the_server_is_healthy_after_the_corpus(server, http):
    r = http.post("/v1/completions", json={"prompt": "still", "max_tokens": 3, "temperature": 1, "seed": 2**64 - 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert http.get("/health").status_code == 200
    server.wait_for_metric("kvserve_kv_cache_blocks", 0, variant="native", state="used")
