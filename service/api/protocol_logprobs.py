"""Logprobs in OpenAI's two shapes: the completions one (parallel lists) and the chat one (per token).

Both are built from the engine's TokenLogprob entries; `token_strings(ids)` names the tokens.
JSON has no -inf, so impossible tokens are reported as MIN_LOGPROB, as OpenAI does. No FastAPI here.
"""
from __future__ import annotations

from pydantic import BaseModel

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens like this


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []   # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one per token id (the prompt's token and the top-k)."""
    logprob: float
    rank: int | None = None
    decoded_token: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


def clamp_logprob(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


def completion_logprobs(entries, token_strings, start_offset: int = 0) -> CompletionLogprobs:
    """OpenAI completions shape from TokenLogprobs; `token_strings(ids)` names tokens."""
    names = token_strings([e.token_id for e in entries])
    offsets, pos = [], start_offset
    for name in names:
        offsets.append(pos)
        pos += len(name)
    tops: list[dict[str, float] | None] = []
    for e in entries:
        top_names = token_strings([t for t, _ in e.top])
        tops.append({n: clamp_logprob(lp) for n, (_, lp) in zip(top_names, e.top)})
    return CompletionLogprobs(tokens=names, token_logprobs=[clamp_logprob(e.logprob) for e in entries],
                              top_logprobs=tops, text_offset=offsets)


def chat_logprobs(entries, token_strings, token_bytes=None) -> ChatLogprobs:
    """OpenAI chat shape: content = [{token, logprob, bytes, top_logprobs: [...]}]. `token_bytes(ids)`
    gives each token's raw bytes (a byte-level token may be half a character); else its string's UTF-8."""
    def items(ids, logprobs):
        names = token_strings(ids)
        raw = token_bytes(ids) if token_bytes else [n.encode() for n in names]
        return [dict(token=n, logprob=clamp_logprob(lp), bytes=list(b)) for n, lp, b in zip(names, logprobs, raw)]

    content = []
    for e in entries:
        (head,) = items([e.token_id], [e.logprob])
        top = [TopLogprob(**t) for t in items([t for t, _ in e.top], [lp for _, lp in e.top])]
        content.append(ChatTokenLogprob(**head, top_logprobs=top))
    return ChatLogprobs(content=content)
