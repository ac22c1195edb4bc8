"""`kvserve tokenizer` writes a folder that transformers' AutoTokenizer loads and that tokenizes and
renders chats exactly as the served model's tokenizer does (and, for SmolLM2, as transformers'
own tokenizer read from the GGUF)."""
from __future__ import annotations

import json

import pytest

from model.loader import load_tokenizer
from service.cli import main

transformers = pytest.importorskip("transformers")
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n", "français, 日本語, emoji 🙂", "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def written(tmp_path, model: str):
    out = tmp_path / model
    assert main(["tokenizer", "--model", model, "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "config.json",
                                               "generation_config.json"}
    return out, transformers.AutoTokenizer.from_pretrained(str(out))


def check_same(ours, theirs):
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text, add_special_tokens=False)
    assert theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
        ours.apply_chat_template(CHAT, add_generation_prompt=True)
    assert theirs.eos_token_id in ours.eos_token_ids


def test_tiny_tokenizer_folder(tmp_path):
    out, theirs = written(tmp_path, "tiny")
    ours, cfg = load_tokenizer("tiny")
    check_same(ours, theirs)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == cfg.vocab_size


@pytest.mark.slow
def test_smollm2_tokenizer_folder_equals_transformers_from_the_gguf(tmp_path, hf_smollm2):
    _, theirs = written(tmp_path, "smollm2-135m")
    ours, _ = load_tokenizer("smollm2-135m")
    check_same(ours, theirs)
    _, reference = hf_smollm2
    for text in TEXTS:
        assert theirs(text).input_ids == reference(text).input_ids
    assert theirs.apply_chat_template(CHAT, tokenize=False) == reference.apply_chat_template(CHAT, tokenize=False)


def test_a_bad_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["tokenizer", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("kvserve tokenizer: error: unknown model")
