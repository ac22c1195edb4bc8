"""Prompt logprobs: the logprob of every prompt token given the tokens before it (the first token
has none), with its top-k, for requests whose SamplingParams ask for `prompt_logprobs`.

A prefill normally computes logits only at a request's last position (to sample). For such a
request the runner also asks for the logits of each prompt position `p` of the chunk it runs
(they score token p + 1), in an LM-head call of their own, so the sampled rows of the step keep
the kernel their own row count picks (other requests' logits do not change). The entries are
collected on the request, position by position; a chunk recomputed after preemption adds nothing
twice. Positions answered from the prefix cache are never computed, so until its prompt logprobs
are complete a request uses a prefix-cache hit only for the positions it already has
(`usable_prefix_tokens`); the blocks it computes are cached for others as usual.
"""
from __future__ import annotations

import torch
from torch import Tensor

from model.sampling_params import TokenLogprob
from service.engine.request import Request


def positions_needed(req: Request, start: int, num_new: int) -> range:
    """The positions of [start, start + num_new) whose logits score a prompt token not yet scored."""
    entries = req.prompt_logprobs
    if entries is None:
        return range(0)
    first = max(start, len(entries) - 1)
    return range(first, max(first, min(start + num_new, req.num_prompt_tokens - 1)))


def usable_prefix_tokens(req: Request, num_hit: int, block_size: int) -> int:
    """The prefix-cache hit (tokens, whole blocks) this request may use: all of it, unless that
    would skip positions whose prompt logprobs it still needs."""
    entries = req.prompt_logprobs
    if entries is None or len(entries) >= req.num_prompt_tokens:
        return num_hit
    return min(num_hit, (len(entries) - 1) // block_size * block_size)


def record(req: Request, positions: range, logits: Tensor) -> None:
    """Append the entries scored by `logits` (one row per position in `positions`, float32)."""
    entries = req.prompt_logprobs
    assert entries is not None and positions.start == len(entries) - 1, "prompt logprobs recorded out of order"
    k = req.params.prompt_logprobs or 0
    targets = torch.tensor(req.prompt_token_ids[positions.start + 1:positions.stop + 1], device=logits.device)
    lp = logits.log_softmax(dim=-1)                                               # (P, V)
    chosen = lp.gather(1, targets[:, None])                                        # (P, 1)
    ranks = (lp > chosen).sum(dim=1).add(1).tolist()
    top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    for token, value, rank, ids, vals in zip(targets.tolist(), chosen.squeeze(1).tolist(), ranks, top_ids.tolist(),
                                             top_vals.tolist()):
        entries.append(TokenLogprob(token_id=token, logprob=value, top=list(zip(ids, vals)), rank=rank))
