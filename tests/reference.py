"""The independent references tests compare against: the no-cache forward for generation, and
torch's own allocation events for memory.

Each token recomputes the whole sequence with `model(ids[1, T])` (no KV cache, no engine, no
sampler), so it shares nothing with the paged path under test but the weights.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


@torch.inference_mode()
def greedy_no_cache(model, prompt_ids: list[int], max_tokens: int, *,
                    stop_ids: frozenset[int] = frozenset()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens after `prompt_ids` (a stop token included, then it ends), and the log-softmax
    each was chosen from."""
    ids, out, logprobs = list(prompt_ids), [], []
    for _ in range(max_tokens):
        lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
        token = int(lp.argmax())
        out.append(token)
        logprobs.append(lp)
        ids.append(token)
        if token in stop_ids:
            break
    return out, logprobs


def peak_allocated_bytes(fn) -> int:
    """Peak of torch's CPU allocations while fn runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
