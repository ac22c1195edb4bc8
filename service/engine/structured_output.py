"""Structured output: a request's StructuredOutput compiled to a grammar, and its per-request matcher.

xgrammar does the grammar work (chosen by measuring the per-token mask cost on this CPU against
llguidance and outlines-core: benchmarks/grammar_libs.py, BENCHMARKS.md). Its view of the
vocabulary is built here from our tokenizer, offline: every token's raw bytes, special tokens as
empty strings (never allowed), and the tokenizer's end-of-generation ids as the stop tokens a
finished grammar allows. Compiling happens on a small thread pool of its own (xgrammar releases the
GIL), never on the engine thread or the event loop, so a large schema delays only its own request;
compiled grammars are cached by their spec (xgrammar's cache, bounded in bytes), so a schema
compiles once. xgrammar is imported on the first structured request, not at start-up.

Two corrections on top of xgrammar, both as extra masks: its matcher admits byte sequences that
are not UTF-8 (surrogates, overlong forms, code points past U+10FFFF) where a grammar allows "any
character", so every matcher also drops the tokens that would make the text invalid UTF-8; and its
JSON strings admit raw control characters (U+0000-U+001F), which JSON forbids, so JSON grammars
also drop every token holding such a byte (compact JSON needs none; strings escape them).

Each request gets its own GrammarMatcher: the engine thread asks it for the next token's allowed
set (a packed bitmask row), and feeds it every sampled token. Its state is the generated text, so
it survives preemption (a recomputed request keeps its outputs and its matcher) unchanged.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from model.sampling_params import StructuredOutput
from model.tokenizer import Tokenizer
from service.engine.errors import RequestError

COMPILE_THREADS = 2
CACHE_BYTES = 64 << 20
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class TokenMatcher(Protocol):
    """What the engine uses of a request's matcher (xgrammar's GrammarMatcher)."""

    def fill_next_token_bitmask(self, bitmask: Any, index: int = 0) -> Any: ...
    def accept_token(self, token_id: int) -> bool: ...
    def is_terminated(self) -> bool: ...


def _clean(exc: Exception) -> str:
    """xgrammar's C++ error text without its time stamp and source location."""
    return _CPP_PREFIX.sub("", str(exc).strip()).strip()


def check_json_schema(schema: Any) -> None:
    """ValueError naming the problem when `schema` is not a valid JSON Schema (its metaschema's verdict)."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(f"invalid JSON schema{f' at {where}' if where else ''}: {exc.message}") from None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are GBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# A lead byte whose next byte is narrower than 80-BF in UTF-8 (RFC 3629): the allowed range.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
_NEVER_UTF8 = frozenset({0xC0, 0xC1, *range(0xF5, 0x100)})


def _utf8_clean(token: bytes) -> bool:
    """No byte UTF-8 never uses, and no lead byte followed inside the token by a byte it cannot take."""
    if any(b in _NEVER_UTF8 for b in token):
        return False
    return all(a not in _SECOND_BYTE or _SECOND_BYTE[a][0] <= nxt <= _SECOND_BYTE[a][1] for a, nxt in zip(token, token[1:]))


class GuardedMatcher:
    """xgrammar's matcher with the corrections' masks ANDed into every bitmask row it fills.

    `allowed`: the tokens this grammar may ever use (UTF-8-clean ones; for JSON also no control
    byte); after a token ending in a lead byte of _SECOND_BYTE, only tokens starting with a byte
    that lead can take."""
    __slots__ = ("inner", "allowed", "second", "vocab", "lead")

    def __init__(self, inner: Any, allowed: Any, second: dict[int, Any], vocab: list[bytes]):
        self.inner, self.allowed, self.second, self.vocab = inner, allowed, second, vocab
        self.lead: int | None = None

    def fill_next_token_bitmask(self, bitmask: Any, index: int = 0) -> Any:
        self.inner.fill_next_token_bitmask(bitmask, index)
        bitmask[index] &= self.allowed
        if self.lead is not None:
            bitmask[index] &= self.second[self.lead]

    def accept_token(self, token_id: int) -> bool:
        if not self.inner.accept_token(token_id):
            return False
        token = self.vocab[token_id] if token_id < len(self.vocab) else b""
        self.lead = token[-1] if token and token[-1] in _SECOND_BYTE else None
        return True

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer and hands out fresh matchers for them."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, threads: int = COMPILE_THREADS,
                 cache_bytes: int = CACHE_BYTES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_bytes = cache_bytes
        self.bitmask_width = (vocab_size + 31) // 32  # int32 words per bitmask row
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvserve-grammar")
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._vocab: list[bytes] = []
        self._allowed: dict[bool, Any] = {}  # json? -> (bitmask_width,) int32 of the tokens a grammar may use
        self._second: dict[int, Any] = {}    # lead byte -> tokens that may follow it

    def _xgrammar(self) -> Any:
        """xgrammar's GrammarCompiler for our vocabulary, built on first use."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self.tokenizer
                specials = tok.special_token_ids
                raw = tok.token_bytes(range(tok.vocab_size))
                vocab = [b"" if i in specials else b for i, b in enumerate(raw)]
                vocab += [b""] * (self.vocab_size - len(vocab))  # ids past the tokenizer's: never allowed
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=sorted(tok.eos_token_ids))
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                                     cache_limit_bytes=self.cache_bytes)
                self._vocab = vocab
                stops = tok.eos_token_ids
                clean = [_utf8_clean(t) or i in stops for i, t in enumerate(vocab)]
                self._allowed = {False: self._pack(clean),
                                 True: self._pack([ok and (i in stops or all(b >= 0x20 for b in t))
                                                   for i, (ok, t) in enumerate(zip(clean, vocab))])}
                self._second = {lead: self._pack([bool(t) and lo <= t[0] <= hi for t in vocab])
                                for lead, (lo, hi) in _SECOND_BYTE.items()}
            return self._compiler

    def _pack(self, flags: list[bool]) -> Any:
        """Per-token flags -> one packed int32 bitmask row (bit j of word w: token 32 w + j)."""
        import numpy as np
        import torch

        bits = np.zeros(32 * self.bitmask_width, dtype=np.uint8)
        bits[:len(flags)] = flags
        return torch.from_numpy(np.packbits(bits, bitorder="little").view(np.int32).copy())

    def compile(self, spec: StructuredOutput) -> Any:
        """The CompiledGrammar of `spec` (cached); RequestError naming the problem when it is invalid."""
        compiler = self._xgrammar()
        try:
            if spec.kind == "json":
                schema = json.loads(spec.value)
                check_json_schema(schema)
                # compact separators: no runs of whitespace for a small model to get lost in
                return compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=spec.strict)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                choices = spec.choices
                if not choices or not all(isinstance(c, str) and c for c in choices):
                    raise ValueError("choice needs at least one option, each a non-empty string")
                return compiler.compile_grammar(choice_grammar(choices))
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.value)
            return compiler.compile_grammar(spec.value)
        except (ValueError, RuntimeError) as exc:
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
                    "grammar": "grammar", "structural_tag": "tool-call grammar"}[spec.kind]
            message = _clean(exc)
            raise RequestError(message if message.startswith("invalid") else f"invalid {what}: {message}",
                               "structured_output") from None

    def new_matcher(self, compiled: Any, spec: StructuredOutput) -> TokenMatcher:
        import xgrammar as xgr
        return GuardedMatcher(xgr.GrammarMatcher(compiled), self._allowed[spec.kind in ("json", "json_object")],
                              self._second, self._vocab)

    async def matcher(self, spec: StructuredOutput) -> TokenMatcher:
        """A fresh matcher for `spec`, compiled (or found in the cache) off the calling thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self.new_matcher(self.compile(spec), spec))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
