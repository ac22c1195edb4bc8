"""Offline generation (`LLM`, `kvserve generate`) on the real engine, against the no-cache forward.

Greedy text equals the reference; seeded sampling equals a no-cache forward sampled with the same
generator; the sampler's other knobs (top_p, penalties) are honoured, so `kvserve generate` is the
serving path and not a second decode loop. SmolLM2's greedy reply equals transformers' (slow).
"""
from __future__ import annotations

import argparse

import pytest
import torch

from model.sampler import processed_probs, sample_from
from model.sampling_params import SamplingParams
from service.engine import RequestError
from service.engine.llm import LLM
from service.offline import add_generate_args, run_generate
from tests.reference import greedy_no_cache


@pytest.fixture(scope="module")
def llm(tiny):
    with LLM(*tiny) as llm:
        yield llm


def test_greedy_equals_the_no_cache_reference(tiny, llm):
    model, tokenizer = tiny
    prompts = ["Once upon a time", "The paged KV cache", "x"]
    done = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, completion in zip(prompts, done):
        ids = tokenizer.encode(prompt)
        ref, _ = greedy_no_cache(model, ids, 24)
        assert completion.prompt_token_ids == ids
        assert completion.token_ids == ref and completion.finish_reason == "length"
        assert completion.text == tokenizer.decode(ref, skip_special_tokens=True)


def test_chat_renders_the_template(tiny, llm):
    model, tokenizer = tiny
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    [done] = llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(temperature=0, max_tokens=16))
    ref, _ = greedy_no_cache(model, ids, 16, stop_ids=tokenizer.eos_token_ids)
    assert done.prompt_token_ids == ids and done.token_ids == ref


@torch.inference_mode()
def seeded_reference(model, ids: list[int], params: SamplingParams) -> list[int]:
    """The no-cache forward, sampled from the sampler's processed distribution with one uniform per
    token from a generator seeded like the engine's per-request one."""
    gen = torch.Generator().manual_seed(params.seed)
    out: list[int] = []
    for _ in range(params.max_tokens):
        logits = model(torch.tensor([ids + out]))[0, -1:].float()
        probs = processed_probs(logits, [params], [ids], [out])
        u = torch.rand((), dtype=torch.float64, generator=gen).reshape(1)
        out.append(int(sample_from(probs, u)[0]))
    return out


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.5}, {"top_k": 3, "repetition_penalty": 1.3}])
def test_seeded_sampling_honours_every_knob(tiny, llm, extra):
    model, tokenizer = tiny
    ids = tokenizer.encode("abc")
    params = SamplingParams(temperature=0.9, max_tokens=12, seed=7, ignore_eos=True, **extra)
    [done] = llm.generate([ids], params)
    assert done.token_ids == seeded_reference(model, ids, params)


def test_knobs_change_the_text(llm):
    """top_p and the penalties are not ignored: the same seed gives other tokens with them."""
    base = SamplingParams(temperature=1.5, max_tokens=16, seed=3, ignore_eos=True)
    plain, nucleus, penalized = llm.generate(
        ["hello"] * 3, [base, SamplingParams(**{**_fields(base), "top_p": 0.3}),
                         SamplingParams(**{**_fields(base), "frequency_penalty": 2.0})])
    assert nucleus.token_ids != plain.token_ids and penalized.token_ids != plain.token_ids


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def test_refused_requests_raise_before_anything_runs(llm):
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="max_tokens=600 is too large"):
        llm.generate(["a"], SamplingParams(max_tokens=600))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generate_args(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_the_engines_greedy_continuation(tiny, capsys):
    model, tokenizer = tiny
    assert run_generate(cli_args("--model", "tiny", "--prompt", "hello", "--max-tokens", "8", "--no-progress")) == 0
    ref, _ = greedy_no_cache(model, tokenizer.encode("hello"), 8, stop_ids=tokenizer.eos_token_ids)
    assert capsys.readouterr().out == tokenizer.decode(ref, skip_special_tokens=True) + "\n"


def test_cli_sampling_is_repeatable_and_uses_top_p(capsys):
    args = ("--model", "tiny", "--variant", "mqa", "--prompt", "hi", "--max-tokens", "12", "--temperature", "1.2",
            "--seed", "3", "--attention", "naive", "--no-progress")
    outputs = []
    for extra in ((), (), ("--top-p", "0.2")):
        assert run_generate(cli_args(*args, *extra)) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize("argv, message", [
    (("--model", "tiny", "--variant", "gqa-3"), "valid N: 1, 2, 4"),
    (("--model", "no-such-model"), "unknown model 'no-such-model': use one of smollm2-135m, tiny"),
    (("--model", "tiny", "--top-p", "0"), "top_p=0.0 is out of range"),
    (("--model", "tiny", "--max-tokens", "100000"), "max_tokens=100000 is too large"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert run_generate(cli_args(*argv, "--prompt", "x", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_smollm2_greedy_chat_equals_transformers(smollm2, hf_smollm2):
    """The engine's greedy reply (as `kvserve generate --chat` runs it) is transformers' argmax at
    every step, and a real EOS ends it with finish_reason stop."""
    model, tokenizer = smollm2
    hf_model, _ = hf_smollm2
    chat = [{"role": "user", "content": "What is 2 + 2? Answer with one word."}]
    with LLM(model, tokenizer) as llm:
        [done] = llm.chat([chat], SamplingParams(temperature=0, max_tokens=48))
    assert done.finish_reason == "stop" and done.token_ids[-1] in tokenizer.eos_token_ids
    full = torch.tensor([done.prompt_token_ids + done.token_ids])
    with torch.inference_mode():
        ref = hf_model(full).logits[0].argmax(-1)  # ref[i]: the greedy token after position i
    n = len(done.prompt_token_ids)
    assert ref[n - 1:n - 1 + len(done.token_ids)].tolist() == done.token_ids
    assert done.text == tokenizer.decode(done.token_ids, skip_special_tokens=True)
