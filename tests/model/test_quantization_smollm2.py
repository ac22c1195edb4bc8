"""SmolLM2's own Q4_1 codes run natively (q4) against the same checkpoint dequantized (none).

The q4 kernel is fed bfloat16 activations, so logits differ from the dequantized model's by that
rounding, not by any change of weights: the tolerance is bfloat16's. Greedy decoding is compared
token by token along the dequantized model's own continuation: wherever that model's choice is
not a near tie, the q4 model must choose the same token.
"""
from __future__ import annotations

import pytest
import torch

from model.loader import load_model
from model.quantized import dequantize
from model.weight_forms import Q4Form
from tests.reference import greedy_no_cache

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def q4():
    model, _ = load_model("smollm2-135m", dtype=torch.float32, quantization="q4", progress=False)
    return model


def test_the_checkpoints_q4_1_tensors_run_as_stored(q4, smollm2):
    dense, _ = smollm2
    attn = q4.layers[3].attention
    assert isinstance(attn.wq.small, Q4Form) and isinstance(attn.wkv.small, Q4Form)
    # the kernel runs the file's codes: dequantized, they are exactly the dense model's weights
    # (gguf's dequantizer made those); each kernel against its own codes: tests/model/test_weight_forms.py
    assert torch.equal(dequantize(attn.wq.source), dense.layers[3].attention.wq.weight)
    kv = dense.layers[3].attention.wkv.weight
    assert torch.equal(dequantize(attn.wkv.source), kv)
    assert q4.weights.startswith("q4") and q4.output.small.name == "fp16"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_follow_the_dequantized_model(q4, smollm2, prompt):
    dense, tokenizer = smollm2
    ids = tokenizer.encode(prompt)
    tokens, logprobs = greedy_no_cache(dense, ids, 24)
    with torch.inference_mode():
        ours = torch.log_softmax(q4(torch.tensor([ids + tokens]))[0, len(ids) - 1:-1].float(), dim=-1)
    for step, (token, ref) in enumerate(zip(tokens, logprobs)):
        top2 = ref.topk(2).values
        if float(top2[0] - top2[1]) > 0.2:  # not a near tie: bfloat16 activations cannot flip it
            assert int(ours[step].argmax()) == token, (step, tokenizer.decode(tokens[:step + 1]))
    rel = (ours.exp() - torch.stack(logprobs).exp()).abs().sum(-1).max()
    assert rel < 0.1, f"total variation {float(rel):.3f} between the q4 and dequantized next-token distributions"
