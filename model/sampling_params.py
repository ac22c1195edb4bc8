"""Per-request sampling parameters, validated where they are built (the API edge), the structured
output a request's text must match, and the logprobs record the sampler returns for each chosen token."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What a request's generated text must match, as a grammar constrains it token by token.

    kind: json (`value`: a JSON schema, as JSON text), json_object (any JSON object; `value` unused),
    regex (`value`: the pattern, matched in full), choice (`value`: a JSON list of the allowed
    strings) or grammar (`value`: an EBNF grammar with a `root` rule, GBNF-style as llama.cpp and
    xgrammar read it) or structural_tag (`value`: an xgrammar structural tag as JSON text: tool
    calls). `strict` (json only): objects carry exactly the properties the schema names,
    as OpenAI's strict mode; otherwise JSON Schema's own rule (additionalProperties) applies.
    Equal specs compile once (the compiled grammar is cached by this value).
    """
    kind: str
    value: str = ""
    strict: bool = False

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind {self.kind!r} is unknown: use one of {', '.join(STRUCTURED_KINDS)}")

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> StructuredOutput:
        return cls("choice", json.dumps(list(options)))

    @property
    def choices(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choice" else []


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # in (0, 1]
    top_k: int = 0                    # 0 or -1 = off
    min_p: float = 0.0                # in [0, 1]
    repetition_penalty: float = 1.0   # > 0; HF semantics, over prompt and output tokens
    presence_penalty: float = 0.0     # in [-2, 2]; OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0    # in [-2, 2]; OpenAI semantics, over output tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # top-k logprobs of each chosen token, 0..20
    prompt_logprobs: int | None = None  # logprob of each prompt token (the first has none) and its top-k, 0..20
    min_tokens: int = 0               # the first min_tokens generated tokens never end the request
    structured_output: StructuredOutput | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "-1, 0 (off) or a positive count"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "in [0, 20]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: must be {allowed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens!r} is out of range: must be in [0, max_tokens={self.max_tokens}]")


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first
    rank: int | None = None   # prompt logprobs: 1 + the number of tokens likelier than this one
