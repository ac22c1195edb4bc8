"""The sampler's guards: token masks (structured output, min_tokens) restrict only their rows, and
non-finite logits are repaired in their own row or refused naming it; other rows never change."""
from __future__ import annotations

import pytest
import torch

from model.sampler import Sampler, make_generator, processed_probs
from model.sampling_params import SamplingParams
from tests.model.test_sampler import V, random_logits

# ---- token masks (structured output, min_tokens) ----

def _bitmask(allowed_rows: list[list[int]], vocab: int) -> torch.Tensor:
    bits = torch.zeros(len(allowed_rows), 32 * ((vocab + 31) // 32), dtype=torch.bool)
    for g, ids in enumerate(allowed_rows):
        bits[g, ids] = True
    packed = (bits.view(len(allowed_rows), -1, 32).long() << torch.arange(32)).sum(-1)
    return packed.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32)  # wraps like a C uint32 -> int32


def test_token_masks_restrict_only_the_masked_rows_and_keep_raw_logprobs():
    from model.sampler import Sampler, TokenMasks
    torch.manual_seed(0)
    V = 70
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)]
    allowed = [[5, 33, 64], [1, 2, 69]]
    masks = TokenMasks(_bitmask(allowed, V), rows=[0, 2])
    gens = [None, None, torch.Generator().manual_seed(3)]
    tokens, lps = Sampler().sample(logits, params, [[1]] * 3, [[]] * 3, gens, masks)
    assert tokens[0] == max(allowed[0], key=lambda t: float(logits[0, t]))
    assert tokens[1] == int(logits[1].argmax())          # unmasked: untouched
    assert tokens[2] in allowed[1]
    assert lps[0].logprob == pytest.approx(float(logits[0].log_softmax(-1)[tokens[0]]), abs=1e-5)  # the raw distribution


def test_a_ban_is_lifted_when_the_grammar_allows_nothing_else():
    from model.sampler import TokenMasks, apply_token_masks
    logits = torch.zeros(2, 40)
    apply_token_masks(logits, TokenMasks(_bitmask([[7]], 40), rows=[0], banned={0: [7], 1: [3, 4]}))
    assert torch.isfinite(logits[0]).tolist() == [i == 7 for i in range(40)]   # only the stop token: it stays
    assert torch.isneginf(logits[1]).nonzero().squeeze(1).tolist() == [3, 4]  # a plain min_tokens ban


@pytest.mark.parametrize("bad", ["nan", "+inf", "overflowing-penalty", "tiny-temperature"])
def test_non_finite_logits_are_repaired_in_their_own_row_only(bad):
    logits = random_logits(4, seed=11)
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_p=0.9, seed=2)]
    prompts, outputs = [[1, 2]] * 4, [[3]] * 4
    clean = processed_probs(logits, params, prompts, outputs)
    broken = logits.clone()
    if bad == "nan":
        broken[2, 5:20] = float("nan")
    elif bad == "+inf":
        broken[2, 7] = float("inf")
    elif bad == "overflowing-penalty":  # the case: seen tokens' logits divided past float32's range
        params[2] = SamplingParams(temperature=1.0, repetition_penalty=1e-44)
        broken[2, [1, 2, 3]] = broken[2, [1, 2, 3]].abs() + 1
    else:
        params[2] = SamplingParams(temperature=1e-5)  # just above greedy: logits * 1e5
        broken[2] *= 1e35
    probs = processed_probs(broken, params, prompts, outputs)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(probs[[0, 1, 3]], clean[[0, 1, 3]], rtol=0, atol=0)
    if bad == "nan":
        assert (probs[2, 5:20] == 0).all()  # a NaN logit is never chosen
    if bad == "+inf":
        assert probs[2, 7] == 1.0  # +inf beats everything finite
    tokens, _ = Sampler(seed=0).sample(broken, params, prompts, outputs, [make_generator(1), None, None, make_generator(2)])
    expected, _ = Sampler(seed=0).sample(logits, params, prompts, outputs, [make_generator(1), None, None, make_generator(2)])
    assert 0 <= tokens[2] < V and [tokens[i] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)])
def test_a_row_of_nothing_but_nan_is_refused_naming_the_row(params):
    logits = random_logits(3, seed=12)
    logits[1] = float("nan")
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]: no token has a finite logit"):
        Sampler(seed=0).sample(logits, [params] * 3, [[1]] * 3, [[]] * 3, [None] * 3)
    # the same row alone in a greedy batch takes the full path too, instead of returning argmax's NaN index
    tokens, _ = Sampler(seed=0).sample(logits[[0, 2]], [params] * 2, [[1]] * 2, [[]] * 2, [None] * 2)
    assert all(0 <= t < V for t in tokens)
