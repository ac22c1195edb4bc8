"""Over HTTP, as a user checks it with the openai client: the same chat request gives the same text
and logprobs whether its prefix came from the cache or not, alone or beside other requests, and on
a second server started after the first (its start-up probes measured afresh)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from tests.service.live_server import API_KEY


def messages(mode: str) -> list[dict]:
    """A prompt of its own per sampling mode, so that each mode's first request finds a cold cache."""
    return [{"role": "system", "content": f"{mode}: you are a terse assistant for colour questions."},
            {"role": "user", "content": "Name three primary colours."}]
OTHERS = [[{"role": "user", "content": f"Tell me about the number {i}, in detail please."}] for i in range(7)]


def ask(client: OpenAI, messages, **sampling) -> tuple[str, list[float], int]:
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, logprobs=True,
                                       extra_body={"ignore_eos": True}, **sampling)
    logprobs = [t.logprob for t in r.choices[0].logprobs.content]
    cached = r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0
    return r.choices[0].message.content, logprobs, cached


def answers(server) -> list[tuple[str, list[float]]]:
    """Greedy and seeded: each first with a cold cache, then again (prefix cached), then among 7 others."""
    client = OpenAI(base_url=server.url("/v1"), api_key=API_KEY, max_retries=0)
    results = []
    for mode, sampling in (("greedy", {"temperature": 0}), ("seeded", {"temperature": 0.9, "seed": 7})):
        prompt = messages(mode)
        cold_text, cold_lp, cold_cached = ask(client, prompt, **sampling)
        warm_text, warm_lp, warm_cached = ask(client, prompt, **sampling)
        assert cold_cached == 0 and warm_cached > 0
        with ThreadPoolExecutor(8) as pool:
            crowd = [pool.submit(ask, client, m, temperature=0.7, seed=i) for i, m in enumerate(OTHERS)]
            busy_text, busy_lp, _ = ask(client, prompt, **sampling)
            for f in crowd:
                f.result()
        assert warm_text == cold_text and busy_text == cold_text, sampling
        assert warm_lp == cold_lp and busy_lp == cold_lp, sampling
        results.append((cold_text, cold_lp))
    return results


def test_same_chat_request_same_text_cached_batched_and_on_a_second_server(start_server):
    first = start_server("--api-key", API_KEY, "--max-model-len", "256")
    got = answers(first)
    first.stop()
    second = start_server("--api-key", API_KEY, "--max-model-len", "256")
    assert answers(second) == got
