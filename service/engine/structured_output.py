"""Structured output: a request's StructuredOutput compiled to a grammar, and its per-request matcher.

xgrammar does the grammar work (chosen by measuring the per-token mask cost on this CPU against
llguidance and outlines-core: benchmarks/grammar_libs.py, BENCHMARKS.md). Its view of the
vocabulary is built here from our tokenizer, offline: every token's raw bytes, special tokens as
empty strings (never allowed), and the tokenizer's end-of-generation ids as the stop tokens a
finished grammar allows. xgrammar cannot stop a compile, so a spec not yet seen to compile within
the budget (--grammar-compile-timeout, --grammar-compile-memory) is first compiled in a child
process that is killed at the budget (service.engine.grammar_workers, grammar_zygote): a spec over
it is a 400, and one that fits is then compiled here, on a daemon thread, never on the engine
thread or the event loop. Compiled grammars are cached by their spec (xgrammar's cache, bounded in
bytes). xgrammar is imported on the first structured request, not at start-up.

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

import hashlib
import json
import re
import threading
from collections import OrderedDict
from typing import Any, Protocol

from model.sampling_params import StructuredOutput
from model.tokenizer import Tokenizer
from service.engine.errors import EngineDeadError, RequestError
from service.engine.grammar_workers import CompileBudget, CompilerBusyError, CompileWorkers, Verdict, in_daemon_thread, wait_for

CACHE_BYTES = 64 << 20
PROVEN_SPECS = 4096  # keys of specs seen to compile within the budget (32 bytes each)
SPEC_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
              "grammar": "grammar", "structural_tag": "tool-call grammar"}
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


def compile_spec(compiler: Any, kind: str, value: str, strict: bool = False) -> Any:
    """`compiler` (xgrammar's) compiling one spec; RequestError naming the problem when it is invalid,
    MemoryError when it ran out of memory (a failed C++ allocation under the zygote's RLIMIT_AS)."""
    try:
        if kind == "json":
            check_json_schema(json.loads(value))
            # compact separators: no runs of whitespace for a small model to get lost in
            return compiler.compile_json_schema(value, any_whitespace=False, strict_mode=strict)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(value)
        if kind == "choice":
            choices = json.loads(value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError("choice needs at least one option, each a non-empty string")
            return compiler.compile_grammar(choice_grammar(choices))
        if kind == "structural_tag":
            return compiler.compile_structural_tag(value)
        return compiler.compile_grammar(value)
    except (ValueError, RuntimeError) as exc:
        message = _clean(exc)
        if "bad_alloc" in message:
            raise MemoryError(message) from None
        what = SPEC_NAMES[kind]
        raise RequestError(message if message.startswith("invalid") else f"invalid {what}: {message}",
                           "structured_output") from None


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
    """Compiles StructuredOutputs for one tokenizer and hands out fresh matchers for them.

    A spec not yet proven to compile in time is compiled first by `workers` (killable child
    processes, within `budget`); only then is it compiled here, where nothing can stop a compile, on
    a daemon thread (a compile that is proven bounded never holds up the process's exit)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, budget: CompileBudget | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_bytes = cache_bytes
        self.budget = budget or CompileBudget()
        self.bitmask_width = (vocab_size + 31) // 32  # int32 words per bitmask row
        self.workers = CompileWorkers(self._tokenizer_message, self.budget)
        self._proven: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._vocab: list[bytes] = []
        self._allowed: dict[bool, Any] = {}  # json? -> (bitmask_width,) int32 of the tokens a grammar may use
        self._second: dict[int, Any] = {}    # lead byte -> tokens that may follow it

    def vocabulary(self) -> list[bytes]:
        """xgrammar's view of our tokens: raw bytes, special tokens (and ids past the tokenizer's) empty."""
        tok = self.tokenizer
        specials = tok.special_token_ids
        vocab = [b"" if i in specials else b for i, b in enumerate(tok.token_bytes(range(tok.vocab_size)))]
        return vocab + [b""] * (self.vocab_size - len(vocab))

    def _tokenizer_message(self) -> dict:
        """What the zygote builds its TokenizerInfo from (it needs no xgrammar import here)."""
        return {"vocab": [t.hex() for t in self.vocabulary()], "vocab_size": self.vocab_size,
                "stop_token_ids": sorted(self.tokenizer.eos_token_ids)}

    def _xgrammar(self) -> Any:
        """xgrammar's GrammarCompiler for our vocabulary, built on first use."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                vocab = self.vocabulary()
                info = tokenizer_info(vocab, self.vocab_size, sorted(self.tokenizer.eos_token_ids))
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                                     cache_limit_bytes=self.cache_bytes)
                self._vocab = vocab
                stops = self.tokenizer.eos_token_ids
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
        """The CompiledGrammar of `spec` (cached), compiled in this process and not stoppable: call it
        only for specs proven to compile in time (`matcher` does); RequestError when it is invalid."""
        return compile_spec(self._xgrammar(), spec.kind, spec.value, spec.strict)

    def new_matcher(self, compiled: Any, spec: StructuredOutput) -> TokenMatcher:
        import xgrammar as xgr
        return GuardedMatcher(xgr.GrammarMatcher(compiled), self._allowed[spec.kind in ("json", "json_object")],
                              self._second, self._vocab)

    async def matcher(self, spec: StructuredOutput) -> TokenMatcher:
        """A fresh matcher for `spec`: proven in a worker within the budget if it is new, then compiled
        (or found in the cache) here, off the calling thread. RequestError when it is invalid or over
        the budget; CompilerBusyError when the workers are full. Cancelling the caller cancels the compile."""
        key = spec_key(spec)
        if key not in self._proven:
            await self._prove(spec, key)
            with self._lock:
                self._proven[key] = None
                while len(self._proven) > PROVEN_SPECS:
                    self._proven.popitem(last=False)
        with self._lock:
            if key in self._proven:
                self._proven.move_to_end(key)
        compiled = await in_daemon_thread(lambda: self.compile(spec))
        return self.new_matcher(compiled, spec)

    async def _prove(self, spec: StructuredOutput, key: bytes) -> None:
        job = self.workers.submit(spec, key)
        try:
            await in_daemon_thread(self._xgrammar)  # imported here meanwhile (once; seconds), for the matcher
            verdict = await wait_for(job.future)
        finally:
            self.workers.release(job)
        if verdict.status != "ok":
            raise self.refusal(spec, verdict)

    def refusal(self, spec: StructuredOutput, verdict: Verdict) -> Exception:
        """What a request is answered when its spec did not compile in a worker."""
        what = SPEC_NAMES[spec.kind]
        if verdict.status == "invalid":
            return RequestError(verdict.message, "structured_output")
        if verdict.status == "timeout":
            return RequestError(f"the {what} is too complex to compile within {self.budget.timeout:g}s "
                                "(--grammar-compile-timeout): simplify it", "structured_output")
        if verdict.status == "memory":
            return RequestError(f"the {what} needs more than {self.budget.memory >> 20} MiB to compile "
                                "(--grammar-compile-memory): simplify it", "structured_output")
        if verdict.status == "crashed":
            return RequestError(f"the {what} could not be compiled: {verdict.message} (a compile may use "
                                f"{self.budget.memory >> 20} MiB: --grammar-compile-memory)", "structured_output")
        if verdict.status == "unavailable":
            return EngineDeadError(f"grammar compiler unavailable: {verdict.message}")
        return CompilerBusyError(f"the {what}'s compile was cancelled")

    def close(self) -> None:
        self.workers.close()


def tokenizer_info(vocab: list[bytes], vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's TokenizerInfo of a raw-bytes vocabulary (here and in the zygote alike)."""
    import xgrammar as xgr
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_token_ids)


def spec_key(spec: StructuredOutput) -> bytes:
    return hashlib.sha256(f"{spec.kind}\0{int(spec.strict)}\0{spec.value}".encode("utf-8", "surrogatepass")).digest()
