"""Batched next-token sampler: one token per row of a (S, V) logits tensor, each row with its own
SamplingParams.

Order of the logits processors (as vLLM / transformers): repetition penalty (HF semantics, over
prompt and output tokens), presence and frequency penalties (OpenAI semantics, over output tokens),
temperature, top_k, top_p, min_p, then sampling. Every step is a tensor op over all rows; the only
Python loops are over the S rows (building penalty indices, drawing from per-request generators).

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) picks token i with probability
p_i. A seeded request draws exactly one V-sized q per step from its own generator, so its tokens do
not depend on which other requests share the batch. Unseeded rows share the sampler's generator.

`processed_probs` is the pure function "the distribution a row samples from"; tests compare it to
a float64 reference. This module does not own request state: the caller passes prompt and output
ids each step.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from model.sampling_params import SamplingParams
from service.outputs import TokenLogprob

# Below this temperature a row is treated as greedy: dividing by a smaller value can overflow
# float32 logits to inf and turn the softmax into NaN (vLLM uses the same cut-off).
MIN_TEMPERATURE = 1e-5


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < MIN_TEMPERATURE


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator of a seeded request; create it once, on the logits' device."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _token_index(ids: list[Sequence[int]], vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, token id) of every token of every row, flattened: two (N,) int64 tensors.

    Ids the logits have no column for (a tokenizer larger than the model's head) are skipped, as
    transformers does: the model cannot produce them, so there is nothing to penalize.
    """
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
    keep = tokens < vocab_size
    return rows[keep].to(device), tokens[keep].to(device)


def apply_penalties(logits: Tensor, params: Sequence[SamplingParams],
                    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> None:
    """In place on (S, V) float logits: repetition, then presence and frequency penalties."""
    S, V = logits.shape
    rep_rows = [i for i in range(S) if params[i].repetition_penalty != 1.0]
    if rep_rows:
        # HF RepetitionPenaltyLogitsProcessor: a token seen anywhere (prompt or output) has its
        # logit divided by the penalty when positive, multiplied when negative.
        seen = torch.zeros(len(rep_rows), V, dtype=torch.bool, device=logits.device)
        r, t = _token_index([list(prompt_ids[i]) + list(output_ids[i]) for i in rep_rows], V, logits.device)
        seen[r, t] = True
        penalty = torch.tensor([params[i].repetition_penalty for i in rep_rows],
                               dtype=logits.dtype, device=logits.device).unsqueeze(1)  # (R, 1)
        sub = logits[rep_rows]                                                         # (R, V)
        penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
        logits[rep_rows] = torch.where(seen, penalized, sub)

    pf_rows = [i for i in range(S) if params[i].presence_penalty != 0.0 or params[i].frequency_penalty != 0.0]
    if pf_rows:
        # OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty,
        # with count over the generated tokens only.
        counts = torch.zeros(len(pf_rows), V, dtype=logits.dtype, device=logits.device)
        r, t = _token_index([output_ids[i] for i in pf_rows], V, logits.device)
        counts.index_put_((r, t), torch.ones_like(t, dtype=logits.dtype), accumulate=True)
        freq = torch.tensor([params[i].frequency_penalty for i in pf_rows],
                            dtype=logits.dtype, device=logits.device).unsqueeze(1)     # (R, 1)
        pres = torch.tensor([params[i].presence_penalty for i in pf_rows],
                            dtype=logits.dtype, device=logits.device).unsqueeze(1)
        logits[pf_rows] -= counts * freq + (counts > 0).to(logits.dtype) * pres


def apply_filters(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """(R, V) temperature-scaled logits -> the same with top_k / top_p / min_p losers at -inf.

    top_k keeps every token tied with the k-th largest. top_p keeps the smallest prefix (by
    descending probability) whose cumulative probability reaches top_p; the most likely token is
    always kept. min_p drops tokens with p < min_p * p_max. A row whose filter is off is untouched,
    bit for bit, so a row's result does not depend on its neighbours' settings.
    """
    R, V = logits.shape
    dev = logits.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=dev)   # (R,)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)          # (R,)
    min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)          # (R,)
    use_k, use_p, use_min_p = bool((top_k < V).any()), bool((top_p < 1).any()), bool((min_p > 0).any())

    if use_k or use_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)                          # (R, V)
        if use_k:
            kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))                          # (R, 1)
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if use_p:
            probs = sorted_logits.softmax(dim=-1)
            # exclusive cumulative sum: the mass strictly before each token (0 for the best one)
            before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=1)
            drop = (before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)

    if use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)                  # (R, 1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def processed_logits(logits: Tensor, params: Sequence[SamplingParams],
                     prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> Tensor:
    """(S, V) raw logits -> (S, V) float32 logits after every processor; filtered tokens are -inf.

    Greedy rows get the penalties only (temperature and the filters never change an argmax).
    """
    x = logits.float().clone()
    if any(_has_penalties(p) for p in params):
        apply_penalties(x, params, prompt_ids, output_ids)
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if rows:
        temperature = torch.tensor([params[i].temperature for i in rows], device=x.device).unsqueeze(1)
        x[rows] = apply_filters(x[rows] / temperature, [params[i] for i in rows])
    return x


def processed_probs(logits: Tensor, params: Sequence[SamplingParams],
                    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> Tensor:
    """(S, V) float32: the distribution each row samples from (one-hot at the argmax for greedy rows)."""
    x = processed_logits(logits, params, prompt_ids, output_ids)
    probs = x.softmax(dim=-1)
    greedy = [i for i, p in enumerate(params) if is_greedy(p)]
    if greedy:
        one_hot = torch.zeros(len(greedy), x.shape[1], dtype=probs.dtype, device=x.device)
        one_hot.scatter_(1, x[greedy].argmax(dim=-1, keepdim=True), 1.0)
        probs[greedy] = one_hot
    return probs


class Sampler:
    """Picks one token per row. Holds only the shared generator of unseeded requests."""

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self._seed is None:
                g.seed()  # nondeterministic, so two server runs differ
            else:
                g.manual_seed(self._seed)
            self._generators[device] = g
        return g

    @torch.inference_mode()
    def sample(self, logits: Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
               output_ids: list[list[int]], generators: list[torch.Generator | None],
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (S, V) -> (one token id per row, its TokenLogprob or None per row)."""
        S, V = logits.shape
        if len(params) != S or len(prompt_ids) != S or len(output_ids) != S or len(generators) != S:
            raise ValueError(f"sample() got {S} logits rows but {len(params)} params, {len(prompt_ids)} "
                             f"prompts, {len(output_ids)} outputs, {len(generators)} generators")
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want_logprobs and all(is_greedy(p) and not _has_penalties(p) for p in params):
            return logits.argmax(dim=-1).tolist(), [None] * S  # fast path: no softmax at all

        x = processed_logits(logits, params, prompt_ids, output_ids)
        tokens = x.argmax(dim=-1)                                                            # (S,)
        rows = [i for i, p in enumerate(params) if not is_greedy(p)]
        if rows:
            probs = x[rows].softmax(dim=-1)                                                  # (R, V)
            q = self._exponentials(probs, [generators[i] for i in rows])
            tokens[rows] = (probs / q).argmax(dim=-1)
        token_list = tokens.tolist()
        return token_list, self._logprobs(logits, params, token_list, want_logprobs)

    def _exponentials(self, probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
        """(R, V) Exp(1) draws: one V-sized draw per seeded row from its own generator, one
        batched draw for all unseeded rows from the shared generator."""
        q = torch.empty_like(probs)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        for j, g in enumerate(generators):
            if g is not None:
                q[j].exponential_(generator=g)
        if len(unseeded) == len(generators):
            q.exponential_(generator=self._shared_generator(probs.device))
        elif unseeded:
            draw = torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype, device=probs.device)
            q[unseeded] = draw.exponential_(generator=self._shared_generator(probs.device))
        # q == 0 would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    @staticmethod
    def _logprobs(logits: Tensor, params: list[SamplingParams], tokens: list[int],
                  rows: list[int]) -> list[TokenLogprob | None]:
        """Logprobs from the model's raw distribution (before penalties and temperature)."""
        out: list[TokenLogprob | None] = [None] * len(params)
        if not rows:
            return out
        lp = logits[rows].float().log_softmax(dim=-1)                                        # (R, V)
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device)).squeeze(1)
        k = max(params[i].logprobs for i in rows)
        top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        chosen, top_vals, top_ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            n = params[i].logprobs
            out[i] = TokenLogprob(token_id=tokens[i], logprob=chosen[j],
                                  top=list(zip(top_ids[j][:n], top_vals[j][:n])))
        return out
