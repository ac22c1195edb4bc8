"""The tokenizer's facts: end-of-generation ids, and the byte-level tokenizer of the tiny model
against the bytes of the text."""
from __future__ import annotations

import pytest

from model.tokenizer import HFTokenizer, byte_tokenizer


def test_extra_eos_token_ids_end_generation():
    tok = byte_tokenizer()
    extended = HFTokenizer(tok.backend, special_tokens=tok.special_tokens, extra_eos_token_ids=[3 + 46])
    assert extended.eos_token_ids == {0, 2, 3 + 46}
    with pytest.raises(ValueError, match="eos token id 259 is out of range"):
        HFTokenizer(tok.backend, special_tokens=tok.special_tokens, extra_eos_token_ids=[259])


def test_byte_tokenizer_is_bytes_plus_three_specials():
    tok = byte_tokenizer()
    assert tok.vocab_size == 259 and tok.eos_token_id == 2 and tok.bos_token_id is None
    assert tok.special_token_ids == {0, 1, 2} and tok.eos_token_ids == {0, 2}
    text = "héllo, 世界 😀\n\t"
    assert tok.encode(text) == [3 + b for b in text.encode("utf-8")]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|im_start|>b<|im_end|>") == [3 + 97, 1, 3 + 98, 2]
    assert tok.decode([3 + 97, 1, 2, 0], skip_special_tokens=True) == "a"
    assert tok.convert_ids_to_tokens([3 + 32, 3 + 0xC3, 1]) == [" ", "bytes:\\xc3", "<|im_start|>"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
