"""The limits table (service.api.limits) on its own: ranges, messages, the budget, and the README's copy."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from model.sampling_params import SamplingParams
from service.api.limits import FIELDS, SEED_MAX, SEED_MIN, Limits, check_fields, check_seed, shown, table
from service.engine.errors import RequestError

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.parametrize("field,good,bad", [
    ("temperature", [0, 0.7, 100], [-0.01, 100.5, math.inf, math.nan]),
    ("top_p", [1e-9, 1], [0, 1.01, math.nan]),
    ("top_k", [-1, 0, 1, 10**6], [-2, -10]),
    ("min_p", [0, 1], [-1e-9, 1.5]),
    ("repetition_penalty", [0.01, 1, 100], [0, 1e-38, 100.1, math.inf]),
    ("presence_penalty", [-2, 0, 2], [-2.01, 2.01, -math.inf]),
    ("frequency_penalty", [-2, 2], [3, math.nan]),
    ("logprobs", [0, 20], [-1, 21]),
    ("seed", [SEED_MIN, 0, SEED_MAX], [SEED_MIN - 1, SEED_MAX + 1]),
    ("max_tokens", [1, 10**9], [0, -5]),
])
def test_each_field_allows_its_range_and_names_it_otherwise(field, good, bad):
    for value in good:
        check_fields({field: value})
    for value in bad:
        with pytest.raises(RequestError) as info:
            check_fields({field: value}, {field: f"parameters.{field}"})
        assert info.value.param == f"parameters.{field}"
        message = str(info.value)
        assert message.startswith(f"parameters.{field}=")
        assert FIELDS[field].describe() in message
        assert ("finite" in message) == (isinstance(value, float) and not math.isfinite(value))


def test_the_table_is_at_least_as_strict_as_sampling_params():
    # every value the table allows, SamplingParams accepts (its checks stay the model's invariants)
    for field, rule in FIELDS.items():
        for value in (rule.lo, rule.hi, *rule.also):
            if value is not None and rule.holds(value):
                SamplingParams(**{field: int(value) if rule.integer else value})


def test_every_choice_seed_must_fit():
    check_seed(SEED_MAX - 3, 4)
    with pytest.raises(RequestError, match=r"n=5, seed \+ 4 must be <= 18446744073709551615"):
        check_seed(SEED_MAX - 3, 5)
    with pytest.raises(RequestError, match=r"seed=-9223372036854775809 is out of range"):
        check_seed(SEED_MIN - 1, 1)


def test_stop_strings_top_k_and_the_response_budget():
    limits = Limits(max_stop=2, max_stop_chars=3, max_response_tokens=100)
    limits.check_params([SamplingParams(stop=("a", "bcd"), max_tokens=100)], vocab_size=50, max_model_len=10**6)
    cases = [
        ([SamplingParams(stop=("a", "b", "c"))], "stop", "at most 2"),
        ([SamplingParams(stop=("abcd",))], "stop", "at most 3"),
        ([SamplingParams(top_k=51)], "top_k", "-1, 0 (off) or in [1, 50]"),
        ([SamplingParams(max_tokens=50)] * 3, "max_tokens", "150"),
        ([SamplingParams(max_tokens=10, logprobs=9)] * 2, "max_tokens", "200"),
    ]
    for params, param, needle in cases:
        with pytest.raises(RequestError) as info:
            limits.check_params(params, vocab_size=50, max_model_len=10**6)
        assert info.value.param == param and needle in str(info.value)


def test_prompt_characters_and_messages():
    Limits().check_prompt_chars(["x" * 640, [1] * 10**6], max_model_len=10)  # token ids do not count
    with pytest.raises(RequestError, match=r"641 characters; at most 640 .*64 x max_model_len 10"):
        Limits().check_prompt_chars(["x" * 600, "y" * 41], max_model_len=10)
    with pytest.raises(RequestError, match=r"--max-prompt-chars"):
        Limits(max_prompt_chars=5).check_prompt_chars(["abcdef"], max_model_len=10**6)
    with pytest.raises(RequestError, match="at most 3 are accepted") as info:
        Limits(max_messages=3).check_messages(4)
    assert info.value.param == "messages"


def test_the_default_max_tokens_of_chat_fits_the_budget():
    limits = Limits(max_response_tokens=1000)
    assert limits.default_max_tokens(room=500, completions=1, logprobs=0) == 500
    assert limits.default_max_tokens(room=500, completions=4, logprobs=1) == 125
    assert limits.default_max_tokens(room=500, completions=16, logprobs=20) == 2


def test_shown_cuts_long_values():
    assert shown("abc") == "'abc'"
    assert len(shown("x" * 10**6)) < 80 and "1,000,002 characters" in shown("x" * 10**6)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_stop=0"):
        Limits(max_stop=0)
    with pytest.raises(ValueError, match="max_prompt_chars=0"):
        Limits(max_prompt_chars=0)


def test_the_readme_lists_every_limit():
    text = README.read_text(encoding="utf-8")
    for field, allowed, option in table():
        row = f"| {field} | {allowed} | {option} |"
        assert row in text, f"README's limits table lacks: {row}"
