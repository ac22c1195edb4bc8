"""model.hf_writer on the real SmolLM2 (slow): its MQA variant written as a Hugging Face directory is
read by transformers with the same logits, tokenization, chat template and end-of-generation ids,
and by our own loader as the same model. The tokenizer travels GGUF vocabulary -> tokenizer.json."""
from __future__ import annotations

import json

import pytest
import torch

from model.hf_writer import save_hf_checkpoint
from model.loader import load_model
from model.variants import with_variant

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_smollm2_mqa_directory_reads_back_in_transformers_and_kvserve(smollm2, tmp_path):
    model, tokenizer = smollm2
    mqa = with_variant(model, "mqa")
    path = tmp_path / "smollm2-mqa"
    save_hf_checkpoint(mqa, tokenizer, path)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_key_value_heads"], config["num_attention_heads"], config["tie_word_embeddings"]) == (1, 9, True)

    text = "def mean(xs):\n    return sum(xs) / len(xs)  # é, 東京"
    ids = tokenizer.encode(text)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert hf_tokenizer(text).input_ids == ids
    messages = [{"role": "user", "content": "What is MQA?"}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages)
    assert set(transformers.GenerationConfig.from_pretrained(path).eos_token_id) == set(tokenizer.eos_token_ids)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, our_tokenizer = load_model(path, progress=False)
    assert our_tokenizer.encode(text) == ids and our_tokenizer.eos_token_ids == tokenizer.eos_token_ids
    x = torch.tensor([ids])
    with torch.inference_mode():
        expected = mqa(x)
        theirs = hf(x).logits
        # float32 sums in another order; the mean-pooled (unusable) MQA amplifies it beyond the
        # native model's 1e-4: compare against the logits' scale, and the greedy tokens exactly
        assert ((theirs - expected).abs().max() / expected.abs().max()).item() < 1e-4
        assert torch.equal(theirs.argmax(-1), expected.argmax(-1))
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
