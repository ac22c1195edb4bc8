"""huggingface_hub's InferenceClient against a live tiny server: TGI's text_generation, streaming and
not, with details, a grammar, and its ValidationError for a refused parameter."""
from __future__ import annotations

import re

import pytest

from tests.service.live_server import API_KEY

hub = pytest.importorskip("huggingface_hub")
PROMPT = "Blocks of sixteen tokens"


@pytest.fixture(scope="module")
def client(shared_server):
    return hub.InferenceClient(base_url=shared_server.base_url, api_key=API_KEY, timeout=60)


def test_text_generation_plain_and_with_details(tiny_ref, client):
    ref, _ = tiny_ref.greedy(tiny_ref.encode(PROMPT), 6)
    text = client.text_generation(PROMPT, max_new_tokens=6)
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True)
    assert out.generated_text == text and [t.id for t in out.details.tokens][:len(ref)] == ref[:len(out.details.tokens)]
    assert out.details.finish_reason in ("length", "eos_token") and out.details.generated_tokens == len(out.details.tokens)


def test_text_generation_stream(client):
    whole = client.text_generation(PROMPT, max_new_tokens=8)
    pieces = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert "".join(pieces) == whole
    events = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))
    assert events[-1].generated_text == whole and events[-1].details.generated_tokens == len(events)


def test_text_generation_grammar_and_validation_error(client):
    out = client.text_generation("Code:", max_new_tokens=12, grammar={"type": "regex", "value": "[a-f0-9]{6}"})
    assert re.fullmatch("[a-f0-9]{6}", out)
    with pytest.raises(hub.errors.ValidationError, match="watermark"):
        client.text_generation(PROMPT, max_new_tokens=3, watermark=True)
