"""Batched next-token sampler: one token per row of a (S, V) logits tensor, each row with its own
SamplingParams.

Order of the logits processors (as vLLM / transformers): token masks first (a grammar's allowed
tokens, stop tokens banned before min_tokens: see TokenMasks), then repetition penalty (HF
semantics, over prompt and output tokens), presence and frequency penalties (OpenAI semantics, over output tokens),
temperature, top_k, top_p, min_p, then sampling. Every step is a tensor op over all rows; Python
only walks the rows (drawing from per-request generators) and, for penalized rows, their token ids
(to build one index tensor) - never the vocabulary.

Sampling inverts the CDF with one uniform per row: a seeded request draws exactly one number per
step from its own generator, so its tokens do not depend on which other requests share the batch
(every per-row computation here reads that row only). Unseeded rows share the sampler's generator.
One uniform per row, rather than the V exponentials per row of the exponential race, keeps random
number generation from dominating the step on CPU.

`processed_probs` is the pure function "the distribution a row samples from"; tests compare it to
a float64 reference. This module does not own request state: the caller passes prompt and output
ids each step.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.sampling_params import SamplingParams, TokenLogprob

# Tokens a top_p-only row sorts first; all of them only when the nucleus does not fit in these.
CANDIDATES = 1024
# Tokens per block of the two-level inverse CDF (49152 = 192 blocks).
BLOCK = 256
# Below this temperature a row is treated as greedy: dividing by a smaller value can overflow
# float32 logits to inf and turn the softmax into NaN (vLLM uses the same cut-off).
MIN_TEMPERATURE = 1e-5


@dataclass(slots=True)
class TokenMasks:
    """Which tokens some rows may pick this step; rows it does not name are untouched (and cost nothing).

    `bitmask` (G, ceil(V / 32)) int32, one row per entry of `rows`: bit j of word w allows token
    32 * w + j in logits row `rows[g]` (a grammar's mask, packed as xgrammar and llguidance write it).
    `banned[row]`: token ids that row may not pick (stop tokens before min_tokens). Where a ban would
    leave a row nothing its bitmask allows, the ban is lifted: the grammar has ended the text.
    """
    bitmask: Tensor | None = None
    rows: list[int] = field(default_factory=list)
    banned: dict[int, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.rows or self.banned)


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """(G, W) int32 packed allow-bits -> (G, vocab_size) bool, True where a token is allowed."""
    packed = bitmask.contiguous().numpy().view(np.uint8)                                     # (G, 4W) little-endian
    return torch.from_numpy(np.unpackbits(packed, axis=1, count=vocab_size, bitorder="little").view(np.bool_))


def apply_token_masks(logits: Tensor, masks: TokenMasks) -> None:
    """In place on (S, V) float logits: disallowed tokens of the masked rows to -inf."""
    V = logits.shape[1]
    if masks.bitmask is not None and masks.rows:
        # unpack the complement: one pass gives the tokens to drop (numpy's unpackbits is a table lookup)
        dropped = unpack_bitmask(~masks.bitmask, V)                                          # (G, V)
        if logits.device.type == "cpu" and logits.is_contiguous():
            # numpy's masked copy skips runs of kept tokens: 2x faster than masked_fill on real grammar masks
            array = logits.numpy()
            for g, row in enumerate(masks.rows):
                np.copyto(array[row], -np.inf, where=dropped[g].numpy())
        else:
            rows = torch.tensor(masks.rows, device=logits.device)
            logits[rows] = logits[rows].masked_fill(dropped.to(logits.device), float("-inf"))
    for row, ids in masks.banned.items():
        index = torch.tensor([t for t in ids if 0 <= t < V], dtype=torch.long, device=logits.device)
        kept = logits[row, index].clone()
        logits[row, index] = float("-inf")
        if row in masks.rows and bool(torch.isneginf(logits[row]).all()):
            logits[row, index] = kept  # only the banned tokens were left: the grammar allows nothing else


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < MIN_TEMPERATURE


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator of a seeded request; create it once, on the logits' device."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _unique_tokens(ids: list[Sequence[int]], rows: list[int], vocab_size: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """Distinct (row, token) pairs of `ids[j]` in row `rows[j]`, as flat indices row * V + token,
    and how often each occurs: two (N,) int64 tensors.

    Ids the logits have no column for (a tokenizer larger than the model's head) are skipped, as
    transformers does: the model cannot produce them, so there is nothing to penalize.
    """
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    token = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
    flat = (row * vocab_size + token)[token < vocab_size]
    keys, counts = torch.unique(flat, return_counts=True)
    return keys.to(device), counts.to(device)


def apply_penalties(logits: Tensor, params: Sequence[SamplingParams],
                    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> None:
    """In place on contiguous (S, V) float logits: repetition, then presence and frequency penalties.

    Only the logits of tokens that occur are touched: work in the number of tokens, not S * V.
    """
    S, V = logits.shape
    flat = logits.view(-1)
    dev, dtype = logits.device, logits.dtype
    rep_rows = [i for i in range(S) if params[i].repetition_penalty != 1.0]
    if rep_rows:
        # HF RepetitionPenaltyLogitsProcessor: a token seen anywhere (prompt or output) has its
        # logit divided by the penalty when positive, multiplied when negative.
        keys, _ = _unique_tokens([list(prompt_ids[i]) + list(output_ids[i]) for i in rep_rows], rep_rows, V, dev)
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=dtype, device=dev)[keys // V]
        x = flat[keys]
        flat[keys] = torch.where(x < 0, x * penalty, x / penalty)

    pf_rows = [i for i in range(S) if params[i].presence_penalty != 0.0 or params[i].frequency_penalty != 0.0]
    if pf_rows:
        # OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty,
        # with count over the generated tokens only.
        keys, counts = _unique_tokens([output_ids[i] for i in pf_rows], pf_rows, V, dev)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=dtype, device=dev)[keys // V]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=dtype, device=dev)[keys // V]
        flat[keys] -= counts.to(dtype) * freq + pres


def apply_filters(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """(R, V) temperature-scaled logits -> the same with top_k / top_p / min_p losers at -inf.

    top_k keeps the k largest logits; top_p then keeps the smallest prefix (by descending
    probability, renormalized over what top_k kept) whose cumulative probability reaches top_p,
    so the most likely token always stays; min_p drops tokens with p < min_p * p_max. Tokens tied
    with a boundary token are all kept, so no result depends on how a sort orders ties.

    Each filter comes down to one logit threshold per row (min_p: logit < max + log(min_p)), so
    one masked_fill applies them all. Only the candidates above the top_k / top_p threshold are
    sorted (a partial sort of CANDIDATES tokens; the whole row only when a flat distribution needs
    it). Every per-row quantity is computed from that row alone, so a row's result does not depend
    on its neighbours, and a row whose filters are off is untouched.
    """
    R, V = logits.shape
    dev = logits.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=dev)   # (R,)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=dev)         # (R,)
    min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)          # (R,)
    use_k_or_p, use_min_p = bool((top_k < V).any() | (top_p < 1).any()), bool((min_p > 0).any())
    if not (use_k_or_p or use_min_p):
        return logits
    threshold = torch.full((R,), float("-inf"), dtype=logits.dtype, device=dev)              # (R,)
    if use_k_or_p:
        threshold = _top_k_top_p_threshold(logits, top_k, top_p)
    if use_min_p:
        # p < min_p * p_max  <=>  logit < max logit + log(min_p); log(0) = -inf keeps everything
        threshold = torch.maximum(threshold, logits.amax(dim=-1) + min_p.log())
    return logits.masked_fill(logits < threshold.unsqueeze(1), float("-inf"))


def _top_k_top_p_threshold(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """(R, V) logits, (R,) top_k (V = off), (R,) top_p (1 = off) -> (R,) smallest logit to keep."""
    R, V = logits.shape
    use_k, use_p = top_k < V, top_p < 1                                                      # (R,)
    # top_k rows with top_p need one candidate past the k-th, to see whether ties run beyond it
    k = int(torch.where(use_k, top_k + use_p.long(), torch.where(use_p, CANDIDATES, 1)).max())
    threshold, short = _thresholds_from_candidates(logits, top_k, top_p, min(k, V))
    if bool(short.any()):
        # a flat distribution or a long run of ties: sort just those rows in full
        rows = short.nonzero().squeeze(1)
        threshold[rows] = _thresholds_from_candidates(logits[rows], top_k[rows], top_p[rows], V)[0]
    return threshold


def _thresholds_from_candidates(logits: Tensor, top_k: Tensor, top_p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row thresholds from each row's k largest logits: ((R,) threshold, (R,) bool `short`,
    true where the answer may lie beyond the k candidates).

    Each decision reads a prefix of the row's sorted candidates only (cumsum on CPU is a sequential
    prefix sum), so it comes out the same for any k that holds the answer.
    """
    V = logits.shape[1]
    use_k, use_p = top_k < V, top_p < 1                                                      # (R,)
    values, index = logits.topk(k, dim=-1)                                                   # (R, k) sorted
    kth = torch.where(use_k, values.gather(1, (top_k.clamp(max=k) - 1).unsqueeze(1)).squeeze(1),
                      float("-inf"))                                                         # (R,)
    if not bool(use_p.any()):
        return kth, torch.zeros_like(use_p)
    probs = logits.softmax(dim=-1).gather(1, index)  # full-row probabilities of the candidates  (R, k)
    cand = torch.where(values >= kth.unsqueeze(1), probs, 0.0)                              # top_k survivors
    cum = cand.cumsum(dim=-1)                                                                # (R, k)
    # top_p is over the distribution top_k left: renormalize by the mass it kept
    mass = torch.where(use_k, cum[:, -1].double(), 1.0)                                      # (R,)
    before_cut = (cum < top_p.unsqueeze(1) * mass.unsqueeze(1)).sum(dim=-1)                 # (R,)
    cut = values.gather(1, before_cut.clamp(max=k - 1).unsqueeze(1)).squeeze(1)              # (R,)
    short = use_p & ((before_cut >= k) | (use_k & (values[:, -1] >= kth))) & (k < V)
    return torch.where(use_p, torch.maximum(kth, cut), kth), short


def finite_(logits: Tensor) -> Tensor:
    """In place: NaN -> -inf (never chosen) and +inf -> the largest finite value, so a softmax
    stays a distribution. Penalties and temperature can overflow a row (a repetition_penalty of
    1e-44 divides logits past float32's range) and a broken model can emit NaN; each row is
    repaired from its own values only. A row left with nothing finite fails when it samples."""
    return torch.nan_to_num_(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def processed_logits(logits: Tensor, params: Sequence[SamplingParams],
                     prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> Tensor:
    """(S, V) raw logits -> (S, V) float32 logits after every processor; filtered tokens are -inf,
    and no value is NaN or +inf (see `finite_`).

    Greedy rows get the penalties only (temperature and the filters never change an argmax).
    """
    penalized = any(_has_penalties(p) for p in params)
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    every_row = bool(rows) and len(rows) == len(params)
    # a copy when modified in place below; the all-sampled path makes a new tensor anyway
    x = logits.to(torch.float32, copy=penalized or not every_row)
    if penalized:
        apply_penalties(x, params, prompt_ids, output_ids)
    if penalized or not every_row:  # x is a copy here; otherwise x / temperature below is
        finite_(x)
    if not rows:
        return x
    temperature = torch.tensor([params[i].temperature for i in rows], device=x.device).unsqueeze(1)  # (R, 1)
    if every_row:  # no gather / scatter of rows
        return apply_filters(finite_(x / temperature), params)
    x[rows] = apply_filters(finite_(x[rows] / temperature), [params[i] for i in rows])
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


def sample_from(probs: Tensor, u: Tensor) -> Tensor:
    """(R, V) probabilities, (R,) uniforms in [0, 1) -> (R,) token ids, by inverting the CDF.

    Two levels: the CDF over blocks of BLOCK tokens (a vectorized float32 sum per block, where one
    float64 running sum over V would be a slow sequential scan), then the float64 CDF inside the
    chosen block. A token's share of [0, 1) is its probability to float32 precision, like the
    probabilities themselves; a token with probability 0 has an empty interval and is never picked.
    """
    R, V = probs.shape
    pad = (-V) % BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(R, -1, BLOCK)                  # (R, NB, BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)                                   # (R, NB)
    target = u * block_cdf[:, -1]                                                            # (R,)
    b = _search(block_cdf, target)                                                           # (R,)
    before = block_cdf.gather(1, (b - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(b > 0, before, 0.0)                                                 # mass of blocks < b
    inner_cdf = blocks[torch.arange(R, device=probs.device), b].cumsum(dim=-1, dtype=torch.float64)  # (R, BLOCK)
    return b * BLOCK + _search(inner_cdf, target - before)


def _search(cdf: Tensor, target: Tensor) -> Tensor:
    """(R, N) non-decreasing CDFs, (R,) targets -> (R,) first index whose CDF exceeds the target.

    The target may round up to the total (or past it, in the inner level): the answer is then the
    last index with mass, so an index with no mass is never returned.
    """
    index = torch.searchsorted(cdf, target.unsqueeze(1), right=True)                         # (R, 1)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)                    # (R, 1)
    return torch.minimum(index, last).squeeze(1)


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
               masks: TokenMasks | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (S, V) -> (one token id per row, its TokenLogprob or None per row).

        `masks` restricts some rows' choices (the logits are not modified; logprobs stay those of
        the model's raw distribution)."""
        S, V = logits.shape
        if len(params) != S or len(prompt_ids) != S or len(output_ids) != S or len(generators) != S:
            raise ValueError(f"sample() got {S} logits rows but {len(params)} params, {len(prompt_ids)} "
                             f"prompts, {len(output_ids)} outputs, {len(generators)} generators")
        raw = logits
        if masks:
            logits = logits.clone()
            apply_token_masks(logits, masks)
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want_logprobs and all(is_greedy(p) and not _has_penalties(p) for p in params):
            best = logits.argmax(dim=-1)                     # fast path: no softmax at all ...
            if not bool(logits.gather(1, best.unsqueeze(1)).isnan().any()):
                return best.tolist(), [None] * S
            # ... unless a row holds NaN (argmax picks it): the full path repairs or refuses that row

        x = processed_logits(logits, params, prompt_ids, output_ids)
        empty = (x.amax(dim=-1) == float("-inf")).nonzero().squeeze(1).tolist()
        if empty:
            raise ValueError(f"row(s) {empty}: no token has a finite logit (the model's logits were NaN)")
        tokens = torch.empty(S, dtype=torch.long, device=x.device)                          # (S,)
        greedy = [i for i, p in enumerate(params) if is_greedy(p)]
        rows = [i for i, p in enumerate(params) if not is_greedy(p)]
        if greedy:
            tokens[greedy] = (x if len(greedy) == S else x[greedy]).argmax(dim=-1)
        if rows:
            probs = (x if len(rows) == S else x[rows]).softmax(dim=-1)                       # (R, V)
            u = self._uniforms([generators[i] for i in rows], probs.device)                  # (R,)
            tokens[rows] = sample_from(probs, u)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, params, token_list, want_logprobs)

    def _uniforms(self, generators: list[torch.Generator | None], device: torch.device) -> Tensor:
        """(R,) float64 U[0, 1): one draw per seeded row from its own generator, one batched draw
        for all unseeded rows from the shared generator."""
        u = torch.empty(len(generators), dtype=torch.float64, device=device)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        for j, g in enumerate(generators):
            if g is not None:
                u[j] = torch.rand((), dtype=torch.float64, device=device, generator=g)
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, device=device,
                                     generator=self._shared_generator(device))
        return u

    @staticmethod
    def _logprobs(logits: Tensor, params: list[SamplingParams], tokens: list[int],
                  rows: list[int]) -> list[TokenLogprob | None]:
        """Logprobs from the model's raw distribution (before penalties and temperature)."""
        out: list[TokenLogprob | None] = [None] * len(params)
        if not rows:
            return out
        lp = logits[rows].float().log_softmax(dim=-1)                                        # (R, V)
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device)).squeeze(1)
        counts = [params[i].logprobs or 0 for i in rows]
        k = max(counts)
        top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        chosen_list, vals, ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
        for j, (i, n) in enumerate(zip(rows, counts)):
            out[i] = TokenLogprob(token_id=tokens[i], logprob=chosen_list[j], top=list(zip(ids[j][:n], vals[j][:n])))
        return out
