"""Sampler vs independent references: numpy float64 filters, transformers' repetition penalty,
the OpenAI penalty formula by hand, torch's log_softmax; seeds and sampling frequencies."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from model.sampler import Sampler, make_generator, processed_logits, processed_probs
from model.sampling_params import SamplingParams

V = 64


def random_logits(S: int, seed: int, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, vocab, generator=g) * 3  # (S, V)


def ref_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """float64 reference of temperature -> top_k -> top_p -> min_p, written from the definitions."""
    x = logits.astype(np.float64)
    if p.temperature == 0:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    x = x / p.temperature
    if p.top_k > 0:
        kth = np.sort(x)[::-1][min(p.top_k, len(x)) - 1]
        x = np.where(x >= kth, x, -np.inf)
    if p.top_p < 1:
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        n_keep = int(np.searchsorted(cum, p.top_p, side="left")) + 1  # smallest set reaching top_p
        x = np.where(probs >= probs[order[n_keep - 1]], x, -np.inf)   # ... plus anything tied with its last
    if p.min_p > 0:
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        x = np.where(probs >= p.min_p * probs.max(), x, -np.inf)
    probs = np.exp(x - x.max())
    return probs / probs.sum()


FILTER_GRID = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.7),
    SamplingParams(top_k=1),
    SamplingParams(top_k=5),
    SamplingParams(top_k=-1),
    SamplingParams(top_k=1000),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.3),
    SamplingParams(top_p=1e-6),
    SamplingParams(min_p=0.1),
    SamplingParams(min_p=1.0),
    SamplingParams(temperature=0.7, top_k=10, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=20, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=0.4, top_p=0.6, min_p=0.2),
    SamplingParams(temperature=2.0, top_k=3, min_p=0.3),
]


@pytest.mark.parametrize("seed", range(5))
def test_processed_probs_match_float64_reference(seed):
    S = len(FILTER_GRID)
    logits = random_logits(S, seed)
    probs = processed_probs(logits, FILTER_GRID, [[]] * S, [[]] * S)
    for i, p in enumerate(FILTER_GRID):
        ref = ref_probs(logits[i].numpy(), p)
        np.testing.assert_allclose(probs[i].numpy(), ref, atol=2e-6, err_msg=str(p))
        assert ((probs[i].numpy() > 0) == (ref > 0)).all(), f"different support for {p}"


def test_rows_do_not_depend_on_their_neighbours():
    logits = random_logits(len(FILTER_GRID), 11)
    together = processed_probs(logits, FILTER_GRID, [[]] * len(FILTER_GRID), [[]] * len(FILTER_GRID))
    for i, p in enumerate(FILTER_GRID):
        alone = processed_probs(logits[i:i + 1], [p], [[]], [[]])
        assert torch.equal(alone[0], together[i]), p


def test_greedy_is_argmax_on_fast_and_slow_paths():
    logits = random_logits(8, 1)
    sampler = Sampler(seed=0)
    fast, lps = sampler.sample(logits, [SamplingParams(temperature=0)] * 8, [[]] * 8, [[]] * 8, [None] * 8)
    assert fast == logits.argmax(-1).tolist() and lps == [None] * 8
    # mixed with sampled rows and logprobs: the greedy rows still take the argmax
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=1.0)] * 4
    slow, _ = sampler.sample(logits, params, [[]] * 8, [[]] * 8, [None] * 8)
    assert slow[0::2] == logits[0::2].argmax(-1).tolist()
    # a temperature below 1e-5 would overflow float32 logits: it counts as greedy
    tiny, _ = sampler.sample(logits, [SamplingParams(temperature=1e-7)] * 8, [[]] * 8, [[]] * 8, [None] * 8)
    assert tiny == fast


def test_fast_path_skips_the_processors(monkeypatch):
    import model.sampler as sampler_module

    def boom(*args, **kwargs):
        raise AssertionError("the all-greedy batch must not run the processors")

    monkeypatch.setattr(sampler_module, "processed_logits", boom)
    logits = random_logits(4, 2)
    tokens, _ = Sampler().sample(logits, [SamplingParams(temperature=0)] * 4, [[1]] * 4, [[2]] * 4, [None] * 4)
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits(3, 3)
    prompts = [[1, 2, 3, 3], [10, 63, 5], []]
    outputs = [[4, 1], [], [7, 7, 8]]
    params = [SamplingParams(temperature=1.0, repetition_penalty=penalty)] * 3
    ours = processed_logits(logits, params, prompts, outputs)
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        ref = processor(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=0, atol=0)


def test_presence_and_frequency_penalties_match_openai_formula():
    logits = random_logits(3, 4)
    prompts = [[5, 5, 6], [1], [9]]
    outputs = [[5, 2, 2, 2], [3, 3], []]
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
              SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0),
              SamplingParams(presence_penalty=2.0, frequency_penalty=-2.0)]
    ours = processed_logits(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        ref = logits[i].double().clone()
        for tok, count in Counter(outputs[i]).items():  # output tokens only, never the prompt
            ref[tok] -= count * p.frequency_penalty + 1.0 * p.presence_penalty
        np.testing.assert_allclose(ours[i].numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_penalties_then_temperature_then_filters():
    logits = random_logits(1, 5)
    p = SamplingParams(temperature=0.8, top_k=8, top_p=0.9, repetition_penalty=1.5,
                       presence_penalty=0.5, frequency_penalty=0.25)
    prompt, output = [3, 4, 5], [5, 6, 6]
    penalized = RepetitionPenaltyLogitsProcessor(penalty=1.5)(torch.tensor([prompt + output]), logits.clone())[0]
    for tok, count in Counter(output).items():
        penalized[tok] -= count * 0.25 + 0.5
    probs = processed_probs(logits, [p], [prompt], [output])
    np.testing.assert_allclose(probs[0].numpy(), ref_probs(penalized.numpy(), p), atol=2e-6)


def test_penalties_ignore_ids_outside_the_vocab():
    logits = random_logits(1, 6)
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)
    assert torch.equal(processed_logits(logits, [p], [[V + 5]], [[V]]), logits)


def test_greedy_rows_see_penalties():
    logits = torch.zeros(1, V)
    logits[0, 7] = 2.0
    logits[0, 8] = 1.5
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    tokens, _ = Sampler().sample(logits, [p], [[7]], [[]], [None])
    assert tokens == [8]  # 2.0 / 2 = 1.0 < 1.5


def _run_seeded(neighbours: list[SamplingParams], position: int, steps: int = 6) -> list[int]:
    """Tokens of one seeded request over a few steps, placed among `neighbours` at `position`."""
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    sampler = Sampler(seed=99)
    gen = make_generator(1234)
    others = [make_generator(7 + j) if n.seed is not None else None for j, n in enumerate(neighbours)]
    out: list[int] = []
    for step in range(steps):
        params = list(neighbours)
        params.insert(position, mine)
        generators = list(others)
        generators.insert(position, gen)
        S = len(params)
        logits = random_logits(S, 1000 + step)
        logits[position] = random_logits(1, 500 + step)[0]  # my logits do not depend on the batch
        tokens, _ = sampler.sample(logits, params, [[1, 2]] * S, [out] * S, generators)
        out.append(tokens[position])
    return out


def test_seed_reproduces_and_ignores_batch_composition_and_order():
    alone = _run_seeded([], 0)
    assert _run_seeded([], 0) == alone
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5),
             SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=1.0, logprobs=3)]
    assert _run_seeded(mixed, 0) == alone
    assert _run_seeded(mixed, 2) == alone
    assert _run_seeded(mixed[::-1] + mixed, 8) == alone


def test_different_seeds_give_different_streams():
    sampler, logits = Sampler(), torch.zeros(1, V)  # uniform over 64 tokens

    def tokens(seed: int) -> list[int]:
        gen = make_generator(seed)
        return [sampler.sample(logits, [SamplingParams()], [[]], [[]], [gen])[0][0] for _ in range(32)]

    assert tokens(1) == tokens(1) != tokens(2)


def test_shared_generator_is_seedable():
    logits = random_logits(16, 8)
    params = [SamplingParams(temperature=1.0)] * 16
    first = Sampler(seed=3).sample(logits, params, [[]] * 16, [[]] * 16, [None] * 16)[0]
    again = Sampler(seed=3).sample(logits, params, [[]] * 16, [[]] * 16, [None] * 16)[0]
    assert first == again


def _chi_square_ok(counts: np.ndarray, probs: np.ndarray, n: int) -> None:
    """Loose, deterministic (fixed seeds) check that counts follow probs; zero-prob tokens never drawn."""
    assert counts[probs == 0].sum() == 0
    expected = probs * n
    mask = expected > 0
    chi2 = float((((counts[mask] - expected[mask]) ** 2) / expected[mask]).sum())
    dof = int(mask.sum()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, (chi2, dof)


@pytest.mark.parametrize("p", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=6),
                               SamplingParams(temperature=1.2, top_p=0.7, min_p=0.02)])
def test_batched_sampling_frequencies_match_processed_distribution(p):
    n, vocab = 20000, 12
    logits = random_logits(1, 9, vocab).expand(n, vocab).contiguous()
    tokens, _ = Sampler(seed=0).sample(logits, [p] * n, [[]] * n, [[]] * n, [None] * n)
    probs = ref_probs(logits[0].numpy(), p)
    _chi_square_ok(np.bincount(tokens, minlength=vocab), probs, n)


def test_seeded_sampling_frequencies_match_processed_distribution():
    n, vocab = 2000, 10
    p = SamplingParams(temperature=0.9, top_p=0.85, seed=42)
    logits = random_logits(1, 10, vocab)
    sampler, gen = Sampler(), make_generator(42)
    tokens = [sampler.sample(logits, [p], [[]], [[]], [gen])[0][0] for _ in range(n)]
    _chi_square_ok(np.bincount(tokens, minlength=vocab), ref_probs(logits[0].numpy(), p), n)


def test_no_row_samples_a_filtered_token():
    params = [SamplingParams(temperature=t, top_k=k, top_p=tp, min_p=mp, seed=s)
              for t in (0.3, 1.0, 3.0) for k in (0, 2) for tp in (1.0, 0.5) for mp in (0.0, 0.4)
              for s in (None, 17)]
    S = len(params)
    sampler = Sampler(seed=1)
    gens = [make_generator(p.seed) if p.seed is not None else None for p in params]
    for step in range(8):
        logits = random_logits(S, 2000 + step, 256)
        probs = processed_probs(logits, params, [[]] * S, [[]] * S)
        tokens, _ = sampler.sample(logits, params, [[]] * S, [[]] * S, gens)
        assert all(probs[i, t] > 0 for i, t in enumerate(tokens))
        for i, p in enumerate(params):
            assert ref_probs(logits[i].numpy(), p)[tokens[i]] > 0, p


def test_logprobs_are_raw_log_softmax():
    logits = random_logits(3, 12)
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=1.0)]
    tokens, lps = Sampler(seed=0).sample(logits, params, [[1, 2]] * 3, [[3]] * 3, [None] * 3)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert lps[2] is None
    for i in (0, 1):
        lp = lps[i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-5)
    assert lps[1].top == []
    order = torch.argsort(ref[0], descending=True)[:5].tolist()
    assert [t for t, _ in lps[0].top] == order
    for t, v in lps[0].top:
        assert v == pytest.approx(ref[0, t].item(), abs=1e-5)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 logits rows but 1 params"):
        Sampler().sample(random_logits(2, 0), [SamplingParams()], [[]] * 2, [[]] * 2, [None] * 2)


def test_ties_are_kept_together():
    # four equal logits: 0.25 each; any top_p or top_k that keeps one of them keeps all four
    logits = torch.zeros(2, 4)
    logits[1, 3] = -50.0
    params = [SamplingParams(top_p=0.5), SamplingParams(top_k=2)]
    support = (processed_probs(logits, params, [[]] * 2, [[]] * 2) > 0).sum(-1).tolist()
    assert support == [4, 3]


@pytest.mark.parametrize("seed", range(3))
def test_tied_logits_like_bfloat16_match_reference_and_ignore_neighbours(seed):
    # bf16 logits have few distinct values: ties at the top_k / top_p boundaries are common
    S = len(FILTER_GRID)
    logits = random_logits(S, 40 + seed, 4096).to(torch.bfloat16).float()
    probs = processed_probs(logits, FILTER_GRID, [[]] * S, [[]] * S)
    for i, p in enumerate(FILTER_GRID):
        ref = ref_probs(logits[i].numpy(), p)
        np.testing.assert_allclose(probs[i].numpy(), ref, atol=2e-6, err_msg=str(p))
        assert ((probs[i].numpy() > 0) == (ref > 0)).all(), f"different support for {p}"
        assert torch.equal(processed_probs(logits[i:i + 1], [p], [[]], [[]])[0], probs[i])


def test_flat_distribution_nucleus_wider_than_the_candidates():
    from model.sampler import CANDIDATES
    vocab = CANDIDATES * 6
    logits = random_logits(2, 77, vocab) * 0.01  # nearly uniform: top_p=0.9 keeps ~90% of the vocab
    logits[1] = random_logits(1, 78, vocab) * 3  # a peaked row in the same batch
    for params in ([SamplingParams(top_p=0.9), SamplingParams(top_p=0.9)],
                   [SamplingParams(top_k=vocab - 3, top_p=0.99), SamplingParams(top_p=0.5)]):
        probs = processed_probs(logits, params, [[]] * 2, [[]] * 2)
        for i, p in enumerate(params):
            ref = ref_probs(logits[i].numpy(), p)
            assert ((probs[i].numpy() > 0) == (ref > 0)).all()
            np.testing.assert_allclose(probs[i].numpy(), ref, atol=1e-7)
        assert (probs[0] > 0).sum() > CANDIDATES


def test_top_p_renormalizes_over_every_token_tied_at_the_top_k_boundary():
    # top_k=3 keeps 6 tokens (four tie at the 3rd value); top_p=0.8 of those reaches into the tie,
    # so all 6 stay. Normalizing over only the first 4 would stop after 2 tokens.
    logits = torch.full((1, V), -3.0)
    logits[0, :6] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0])
    p = SamplingParams(top_k=3, top_p=0.8)
    probs = processed_probs(logits, [p], [[]], [[]])
    ref = ref_probs(logits[0].numpy(), p)
    assert int((probs > 0).sum()) == int((ref > 0).sum()) == 6
    np.testing.assert_allclose(probs[0].numpy(), ref, atol=1e-7)


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    from model.sampler import BLOCK, sample_from
    g = torch.Generator().manual_seed(5)
    vocab = 3 * BLOCK + 37  # not a whole number of blocks
    probs = torch.rand(6, vocab, generator=g)
    probs[:, BLOCK:2 * BLOCK] = 0  # a whole block without mass
    probs[probs < 0.3] = 0         # and scattered zeros, the last tokens included
    probs[:, -5:] = 0
    probs /= probs.sum(-1, keepdim=True)
    u = torch.tensor([0.0, 0.1, 0.5, 0.77, 1 - 2 ** -53, 1.0], dtype=torch.float64)  # 1.0: rounding's worst case
    tokens = sample_from(probs, u).tolist()
    for i, t in enumerate(tokens):
        p = probs[i].double().numpy()
        cdf = np.cumsum(p)
        target = u[i].item() * cdf[-1]
        assert p[t] > 0
        assert cdf[t] - p[t] - 1e-6 <= target <= cdf[t] + 1e-6
    assert tokens[0] == int(np.flatnonzero(probs[0].numpy())[0])    # u = 0: the first token with mass
    for i in (4, 5):  # u -> 1: the last token with mass
        assert tokens[i] == int(np.flatnonzero(probs[i].numpy())[-1])


def test_bfloat16_logits_sample_like_their_float32_values():
    logits = random_logits(4, 13).to(torch.bfloat16)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1, logprobs=2),
              SamplingParams(top_p=0.8, seed=2), SamplingParams(min_p=0.1, repetition_penalty=1.2, seed=3)]
    runs = []
    for x in (logits, logits.float()):
        gens = [None] + [make_generator(p.seed) for p in params[1:]]
        runs.append(Sampler(seed=0).sample(x, params, [[1, 2]] * 4, [[3]] * 4, gens))
    assert runs[0] == runs[1]
