"""generate_text / `kvserve generate` on the tiny model, against hand-written decoding loops;
and the byte-level tokenizer the tiny model uses, against the bytes of the text."""
from __future__ import annotations

import argparse

import pytest
import torch

from model.generate import add_generate_args, generate_ids, generate_text, run_generate
from model.loader import load_model
from model.tokenizer import Tokenizer, byte_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", progress=False)


def hand_loop(model, ids: list[int], steps: int, stop: frozenset[int], *, temperature=0.0, seed=None) -> list[int]:
    """The reference: one full forward per token, argmax (or a seeded draw), stop on a stop token."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]))[0, -1]
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).item()
            else:
                token = int(torch.argmax(logits))
            if token in stop:
                break
            out.append(token)
    return out


def test_greedy_matches_hand_loop(tiny):
    model, tokenizer = tiny
    prompt = "Once upon a time"
    expected = hand_loop(model, [3 + b for b in prompt.encode()], 24, tokenizer.eos_token_ids)
    assert generate_text(model, tokenizer, prompt, max_tokens=24) == tokenizer.decode(expected, skip_special_tokens=True)
    assert len(expected) > 0


def test_chat_wraps_prompt_in_template(tiny):
    model, tokenizer = tiny
    prompt_ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert prompt_ids[0] == 1 and prompt_ids[-1] == 3 + ord("\n")
    expected = hand_loop(model, prompt_ids, 16, tokenizer.eos_token_ids)
    assert generate_text(model, tokenizer, "hi", chat=True, max_tokens=16) == tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode("abc")
    expected = hand_loop(model, ids, 12, tokenizer.eos_token_ids, temperature=0.8, seed=7)
    got = generate_ids(model, ids, max_tokens=12, eos_token_ids=tokenizer.eos_token_ids, temperature=0.8, seed=7)
    assert got == expected
    other = generate_ids(model, ids, max_tokens=12, eos_token_ids=tokenizer.eos_token_ids, temperature=0.8, seed=8)
    assert other != got


def test_stops_at_end_of_generation_token(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode("xyz")
    free = hand_loop(model, ids, 10, frozenset())
    stop_token = free[3]
    got = generate_ids(model, ids, max_tokens=10, eos_token_ids=frozenset({stop_token}))
    assert got == free[:free.index(stop_token)]


def test_extra_eos_token_ids_end_generation():
    tok = byte_tokenizer()
    extended = Tokenizer(tok.backend, special_tokens=tok.special_tokens, extra_eos_token_ids=[3 + 46])
    assert extended.eos_token_ids == {0, 2, 3 + 46}
    with pytest.raises(ValueError, match="eos token id 259 is out of range"):
        Tokenizer(tok.backend, special_tokens=tok.special_tokens, extra_eos_token_ids=[259])


def test_stops_at_max_seq_len(tiny):
    model, tokenizer = tiny
    max_len = model.config.max_seq_len
    ids = [3 + 97] * (max_len - 3)
    assert len(generate_ids(model, ids, max_tokens=50, eos_token_ids=frozenset())) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens=0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
])
def test_bad_arguments(tiny, kwargs, match):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=match):
        generate_text(model, tokenizer, "a", **kwargs)


def test_empty_and_too_long_prompts(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="empty"):
        generate_text(model, tokenizer, "")
    with pytest.raises(ValueError, match="max_seq_len=512"):
        generate_text(model, tokenizer, "a" * 600)


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generate_args(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_the_continuation(tiny, capsys):
    model, tokenizer = tiny
    rc = run_generate(cli_args("--model", "tiny", "--prompt", "hello", "--max-tokens", "8", "--no-progress"))
    assert rc == 0
    assert capsys.readouterr().out == generate_text(model, tokenizer, "hello", max_tokens=8) + "\n"


def test_cli_variant_and_sampling(capsys):
    args = ("--model", "tiny", "--variant", "mqa", "--prompt", "hi", "--max-tokens", "6", "--temperature", "0.7",
            "--seed", "3", "--attention", "naive", "--no-progress")
    assert run_generate(cli_args(*args)) == 0
    first = capsys.readouterr().out
    assert run_generate(cli_args(*args)) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv, message", [
    (("--model", "tiny", "--variant", "gqa-3"), "valid N: 1, 2, 4"),
    (("--model", "no-such-model"), "unknown model 'no-such-model': use one of smollm2-135m, tiny"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert run_generate(cli_args(*argv, "--prompt", "x", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


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
