"""SmolLM2-135M-Instruct from its GGUF: ours against transformers loading the same file.

Logits, greedy continuations, tokenizer and chat template must all agree with the reference.
Both models are loaded once per session (tests/conftest.py); prompts are short.
"""
from __future__ import annotations

import pytest
import torch

from model.generate import generate_ids

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "naïve café façade — “quotes” ‘single’ … ß Ærøskøbing",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 ✨",
    "numbers 3.14159 1,000,000 2024-01-31 0x1F",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>kvserve<file_sep>model/loader.py<|endoftext|>",
    "",
    " ",
]


def test_logits_match_transformers(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    prompts = [tokenizer.apply_chat_template(CHAT), "The capital of France is"]
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.inference_mode():
            ours, ref = model(ids), hf_model(ids).logits
        assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_greedy_continuation_matches_transformers(smollm2, hf_smollm2):
    """Our 20 greedy tokens (no-cache forward, step by step) are transformers' argmax at every step."""
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    new = generate_ids(model, prompt, max_tokens=20, eos_token_ids=tokenizer.eos_token_ids)
    assert len(new) >= 5
    full = torch.tensor([prompt + new])
    with torch.inference_mode():
        ref = hf_model(full).logits[0].argmax(-1)  # ref[i]: the greedy token after position i
    assert ref[len(prompt) - 1:len(prompt) - 1 + len(new)].tolist() == new
    if len(new) < 20:
        assert int(ref[-1]) in tokenizer.eos_token_ids


def test_tokenizer_facts_match_transformers(smollm2, hf_smollm2):
    _, tokenizer = smollm2
    _, hf_tok = hf_smollm2
    assert tokenizer.vocab_size == len(hf_tok) == 49152
    assert tokenizer.bos_token_id == hf_tok.bos_token_id == 1
    assert tokenizer.eos_token_id == hf_tok.eos_token_id == 2
    assert tokenizer.special_token_ids == frozenset(hf_tok.all_special_ids)
    assert {2, 0} <= tokenizer.eos_token_ids  # <|im_end|> ends a turn, <|endoftext|> a document


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(smollm2, hf_smollm2, text):
    _, tokenizer = smollm2
    _, hf_tok = hf_smollm2
    ids = tokenizer.encode(text)
    assert ids == hf_tok.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == hf_tok.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    # Token strings: each token's own text where it is whole UTF-8, else its bytes spelled out.
    for token_id, shown, raw in zip(ids, tokenizer.convert_ids_to_tokens(ids), tokenizer.token_bytes(ids)):
        alone = hf_tok.decode([token_id])
        if "\ufffd" in alone:
            assert shown == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        else:
            assert shown == alone and raw == alone.encode("utf-8")
    assert b"".join(tokenizer.token_bytes(ids)) == text.encode("utf-8")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3? 日本 😀\n  spaced"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm2, hf_smollm2, messages, add_generation_prompt):
    _, tokenizer = smollm2
    _, hf_tok = hf_smollm2
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == ref
    assert tokenizer.encode(ours, add_special_tokens=False) == hf_tok.encode(ref, add_special_tokens=False)
    if messages[0]["role"] != "system":
        assert ours.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
