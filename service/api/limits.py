"""The one table of what a request may ask for: every range check of the HTTP API lives here.

Two kinds of row. `FIELDS`: the sampling fields, whose ranges are fixed by the API's meaning
(OpenAI's where it has one); `sampling_params` (service.api.protocol) applies them to every
body before a SamplingParams exists, so a bad value never reaches the engine. `Limits`: the
sizes an operator may change (`kvserve serve --max-...`); the pipeline applies them where they
become known: the body size while reading it, prompt characters and message counts before
tokenizing or rendering, and the rest once a request's SamplingParams exist (stop strings, top_k
against the vocabulary, the response budget). Every violation is a RequestError (or a 413 for
the body) naming the field as the client spelled it, the bad value and the allowed range: a 400
counted in kvserve_requests_rejected_total{reason="invalid"}.

The README's limits table is `table()` (tests/service/api/test_limits.py holds them together).
Values echoed into messages are shortened (`shown`), so a 4 MiB string never comes back in an error.
No FastAPI here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.sampling_params import SamplingParams
from service.engine.config import EngineConfig
from service.engine.errors import RequestError

SEED_MIN, SEED_MAX = -2**63, 2**64 - 1   # what a 64-bit generator seed takes (torch.Generator.manual_seed)
MAX_N = 16                               # choices per request
MAX_CHOICES = 128                        # prompts x n of one completions request
MAX_LOGPROBS = 20                        # top logprobs per token (OpenAI's bound)
MAX_CACHE_SALT_CHARS = 4096              # a cache_salt (a tenant id, a token) is short
CHARS_PER_TOKEN_BOUND = 64               # the default prompt-character limit is this x max_model_len
# structured output, checked before anything compiles (service.api.schema_checks); the compile itself
# is bounded by --grammar-compile-timeout / --grammar-compile-memory
MAX_SCHEMA_BYTES = 128 << 10             # a JSON schema, EBNF grammar or choice list, as UTF-8 JSON text
MAX_SCHEMA_DEPTH = 64                    # JSON nesting levels of a schema (an object property is 2)
MAX_SCHEMA_PROPERTIES = 1000             # property definitions in a whole schema
MAX_ENUM_ENTRIES = 1000                  # enum values in a whole schema; entries of a choice list
MAX_PATTERN_CHARS = 1000                 # a regex: guided_regex, a schema's pattern / patternProperties


def shown(value: Any, width: int = 40) -> str:
    """repr(value), cut to about `width` characters: safe to put in an error message."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text):,} characters)"


@dataclass(frozen=True, slots=True)
class Range:
    """An allowed numeric range, `lo`/`hi` inclusive unless open; `also`: values allowed besides it."""
    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()
    integer: bool = False

    def describe(self, hi: float | str | None = None) -> str:
        """"in [0, 100]", "in (0, 1]", "-1, 0 (off) or in [1, 259]"; `hi` overrides the upper bound."""
        top = self.hi if hi is None else hi
        span = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {'inf' if top is None else _num(top)}" \
               f"{')' if self.hi_open or top is None else ']'}"
        if self.also:
            return f"{', '.join(_num(v) for v in self.also)} (off) or in {span}"
        return f"in {span}"

    def holds(self, value: float, hi: float | None = None) -> bool:
        top = self.hi if hi is None else hi
        if value in self.also:
            return True
        above = value > self.lo if self.lo_open else value >= self.lo
        below = top is None or (value < top if self.hi_open else value <= top)
        return above and below


def _num(v: float | str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:g}"


# Sampling fields by their engine (SamplingParams) names. At least as strict as SamplingParams'
# own checks, which stay as the model's invariants for callers that are not the API.
FIELDS: dict[str, Range] = {
    "max_tokens": Range(1, integer=True),          # and prompt + max_tokens <= max_model_len (Engine.validate)
    "temperature": Range(0, 100),                  # 0 = greedy
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(1, also=(-1, 0), integer=True),  # and <= the vocabulary (Limits.check_params)
    "min_p": Range(0, 1),
    "repetition_penalty": Range(0.01, 100),        # HF semantics; 1 = off. Far beyond this, logits overflow
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "prompt_logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "seed": Range(SEED_MIN, SEED_MAX, integer=True),
}


def check_fields(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """RequestError for the first of `values` (engine field -> value; None = not given) outside
    FIELDS; non-finite numbers (NaN, Infinity, 1e400) are never allowed."""
    names = names or {}
    for field, rule in FIELDS.items():
        value = values.get(field)
        if value is None or isinstance(value, bool):
            continue
        api = names.get(field, field)
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{api}={shown(value)} is not a finite number: it must be {rule.describe()}", api)
        if not rule.holds(value):
            raise RequestError(f"{api}={shown(value)} is out of range: it must be {rule.describe()}", api)


def check_seed(seed: int | None, n: int, name: str = "seed") -> None:
    """Choice i of a request samples with seed + i: all n of them must be 64-bit seeds."""
    if seed is None or isinstance(seed, bool):
        return
    if not SEED_MIN <= seed <= SEED_MAX - (n - 1):
        extra = f" (with n={n}, seed + {n - 1} must be <= {SEED_MAX} too)" if n > 1 else ""
        raise RequestError(f"{name}={shown(seed)} is out of range: it must be in [-2**63, 2**64 - 1]{extra}", name)


def check_cache_salt(salt: str | None, name: str = "cache_salt") -> str | None:
    if salt is not None and not 1 <= len(salt) <= MAX_CACHE_SALT_CHARS:
        raise RequestError(f"{name} has {len(salt):,} characters: it must have 1 to {MAX_CACHE_SALT_CHARS}", name)
    return salt


def check_n(n: int, name: str = "n") -> int:
    if not 1 <= n <= MAX_N:
        raise RequestError(f"{name}={shown(n)} is out of range: it must be in [1, {MAX_N}]", name)
    return n


def check_choices(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise RequestError(f"{num_prompts} prompts x n={n} is {num_prompts * n} completions; "
                           f"at most {MAX_CHOICES} per request", "prompt")


@dataclass(frozen=True, slots=True)
class Limits:
    """The sizes an operator may change (each a `kvserve serve` option and KVSERVE_* variable)."""
    max_body_bytes: int = 4 << 20          # --max-body-bytes: larger bodies get 413
    max_prompt_chars: int | None = None    # --max-prompt-chars; None: CHARS_PER_TOKEN_BOUND x max_model_len
    max_messages: int = 2048               # --max-messages: chat messages per request
    max_stop: int = 4                      # --max-stop: stop strings per request (OpenAI's 4)
    max_stop_chars: int = 256              # --max-stop-chars: characters per stop string
    max_response_tokens: int = 1 << 17     # --max-response-tokens: prompts x n x max_tokens x (1 + logprobs)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_stop", "max_stop_chars", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: must be >= 1")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars={self.max_prompt_chars} is out of range: must be >= 1")

    # ---- before tokenizing ----

    def prompt_chars(self, max_model_len: int) -> int:
        """Characters a request's prompt text may have in all (before it is tokenized)."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return CHARS_PER_TOKEN_BOUND * max_model_len

    def check_prompt_chars(self, texts: Sequence[Any], max_model_len: int, name: str = "prompt") -> None:
        total = sum(len(t) for t in texts if isinstance(t, str))
        limit = self.prompt_chars(max_model_len)
        if total > limit:
            how = ("--max-prompt-chars" if self.max_prompt_chars is not None
                   else f"{CHARS_PER_TOKEN_BOUND} x max_model_len {max_model_len}; --max-prompt-chars")
            raise RequestError(f"{name} has {total:,} characters; at most {limit:,} are accepted ({how})", name)

    def check_messages(self, count: int, name: str = "messages") -> None:
        if count > self.max_messages:
            raise RequestError(f"{name} holds {count:,} messages; at most {self.max_messages:,} are accepted "
                               "(--max-messages)", name)

    # ---- once the SamplingParams exist ----

    def check_params(self, params: Sequence[SamplingParams], vocab_size: int, max_model_len: int) -> None:
        """The limits that need the server: stop strings, top_k against the vocabulary, and the
        response budget over every engine request of one HTTP request (engine field names). A
        max_tokens beyond the context is left to the engine's validation, whose error says so."""
        for p in params:
            if len(p.stop) > self.max_stop:
                raise RequestError(f"stop has {len(p.stop):,} strings; at most {self.max_stop} are accepted "
                                   "(--max-stop)", "stop")
            long = next((s for s in p.stop if len(s) > self.max_stop_chars), None)
            if long is not None:
                raise RequestError(f"stop string {shown(long)} has {len(long):,} characters; at most "
                                   f"{self.max_stop_chars} are accepted (--max-stop-chars)", "stop")
            if p.top_k > vocab_size:
                raise RequestError(f"top_k={p.top_k} is out of range: it must be "
                                   f"{FIELDS['top_k'].describe(vocab_size)} (the vocabulary size)", "top_k")
        if any(p.max_tokens > max_model_len for p in params):
            return
        total = sum(p.max_tokens * (1 + (p.logprobs or 0)) for p in params)
        if total > self.max_response_tokens:
            p = max(params, key=lambda q: q.max_tokens)
            raise RequestError(
                f"max_tokens={p.max_tokens} is too large for one response: {len(params)} completions x max_tokens "
                f"x (1 + logprobs={p.logprobs or 0}) is {total:,} tokens and logprobs; at most "
                f"{self.max_response_tokens:,} per request (--max-response-tokens)", "max_tokens")

    def default_max_tokens(self, room: int, completions: int, logprobs: int) -> int:
        """max_tokens when a chat request leaves it out: the context's room, within the budget."""
        return max(1, min(room, self.max_response_tokens // (completions * (1 + logprobs))))


def table(limits: Limits | None = None) -> list[tuple[str, str, str]]:
    """(field, allowed, how to change it): the README's limits table, from the rows above."""
    limits = limits or Limits()
    compile_budget = EngineConfig()
    rows = [
        ("request body", f"<= {limits.max_body_bytes:,} bytes (413 beyond)", "--max-body-bytes"),
        ("prompt / messages / inputs (characters, before tokenizing)",
         f"<= {CHARS_PER_TOKEN_BOUND} x max_model_len in all", "--max-prompt-chars"),
        ("messages", f"1 to {limits.max_messages:,}", "--max-messages"),
        ("prompt (completions)", f"prompts x n <= {MAX_CHOICES}", "fixed"),
        ("n", f"in [1, {MAX_N}]", "fixed"),
        ("max_tokens / max_completion_tokens / max_new_tokens", ">= 1 (0 with echo); prompt + max_tokens <= max_model_len",
         "--max-model-len"),
        ("response budget", f"completions x max_tokens x (1 + logprobs) <= {limits.max_response_tokens:,}",
         "--max-response-tokens"),
        ("stop", f"<= {limits.max_stop} strings of 1 to {limits.max_stop_chars} characters",
         "--max-stop, --max-stop-chars"),
        ("stop_token_ids", "each in [0, vocab_size - 1]", "fixed"),
        ("cache_salt", f"1 to {MAX_CACHE_SALT_CHARS:,} characters", "fixed"),
        ("JSON schema / grammar / choice list (guided_*, response_format, structured_outputs, parameters.grammar)",
         f"<= {MAX_SCHEMA_BYTES:,} bytes as JSON text", "fixed"),
        ("JSON schema nesting", f"<= {MAX_SCHEMA_DEPTH} levels (an object property takes 2)", "fixed"),
        ("JSON schema properties", f"<= {MAX_SCHEMA_PROPERTIES:,} in the whole schema", "fixed"),
        ("enum values / choices", f"<= {MAX_ENUM_ENTRIES:,} in the whole schema / list", "fixed"),
        ("regex (guided_regex, pattern, patternProperties)", f"<= {MAX_PATTERN_CHARS:,} characters", "fixed"),
        ("grammar compile", f"<= {compile_budget.grammar_compile_timeout:g} s and "
         f"{compile_budget.grammar_compile_memory >> 20} MiB per spec, {compile_budget.grammar_compile_workers} at "
         "once (400 / 503 beyond)", "--grammar-compile-timeout, --grammar-compile-memory, --grammar-compile-workers"),
    ]
    shown_as = {"logprobs": "logprobs / top_logprobs (chat) / top_n_tokens (/generate)",
                "prompt_logprobs": "prompt_logprobs (and logprobs with echo)"}
    for field, rule in FIELDS.items():
        if field == "max_tokens":
            continue
        allowed = rule.describe("vocab_size" if field == "top_k" else None)
        if field == "seed":
            allowed = "in [-2**63, 2**64 - 1], and seed + n - 1 too"
        rows.append((shown_as.get(field, field), allowed + ("" if rule.integer else ", finite"), "fixed"))
    return rows
