"""Incremental, UTF-8-safe detokenization of one request's generated tokens.

A byte-level BPE can split one character over several tokens, so decoding token by token would
show U+FFFD for the halves. The window technique (as in vLLM and TGI): keep two offsets into the
token list, `prefix_offset` <= `read_offset`. Text for tokens before `read_offset` has been emitted.
Each push decodes only the window [prefix_offset:] and the prefix [prefix_offset:read_offset];
the new text is the difference. The prefix gives the decoder its left context (a tokenizer may
render a token differently at the start of a string). While the window's decode ends in U+FFFD the
last character is incomplete, so nothing is emitted and the offsets stay; once it is complete
both offsets move forward, so the window holds only the few tokens of the last character or two
and the cost per token stays constant however long the sequence grows.

Invariant: the concatenation of every `push` plus `flush` equals
`tokenizer.decode(output_ids, skip_special_tokens=...)`. With `prompt_ids`, the text is rendered as
the continuation of the prompt instead (the same for a byte-level BPE; a SentencePiece-style
decoder would drop the first word's leading space without that context).
An invalid byte sequence (possible only if the model emits one) shows as U+FFFD, exactly as in the
full decode; it is held back, like an incomplete character, until a complete character follows it
or `flush` is called.
"""
from __future__ import annotations

from collections.abc import Sequence

from model.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context for the first generated token (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of printable text, one request at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or ())[-PROMPT_CONTEXT_TOKENS:]
        # A prompt that ends inside a character must not lend its bytes to the output's first
        # character: the output's text is its own decode, whatever the prompt.
        while context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith(REPLACEMENT_CHAR):
            context.pop()
        self._ids: list[int] = context  # prompt context, then every generated token
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds generated tokens; returns the text that became printable (possibly "")."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever is held back, even an incomplete character (as U+FFFD), at the end."""
        return self._advance(final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        # A window that renders no longer than its prefix (a skipped special token) has nothing
        # new; keep the offsets so the next token is decoded with the same context.
        if len(window_text) <= len(prefix_text) and not final:
            return ""
        if window_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        new_text = window_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(new_text)
        return new_text
