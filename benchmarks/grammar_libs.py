"""Structured-output libraries compared on this CPU: per-token mask cost, compile time, set-up time.

    python -m benchmarks.grammar_libs [--repeats 5]

The question behind it: which maintained grammar library should mask SmolLM2's 49152-token
vocabulary at every decode step? Each library that is installed (xgrammar, llguidance,
outlines-core; install the others with `pip install --no-deps` to compare) gets the same work:
1. set-up: its tokenizer view built from our vocabulary (token bytes, special tokens, EOS ids),
   offline, as the server would build it once at start;
2. compile: each grammar below, from nothing (the server caches the result per grammar);
3. per token: walk a fixed valid output (our tokenizer's ids of a valid document) and, at each
   step, fill a packed int32 bitmask row (the mask) and then advance the matcher by the token.
   The mean over the walk is what one constrained row adds to a decode step on the engine thread.
Grammars: a nested JSON schema (objects in objects, an array of objects, enums, integer and
number ranges, a pattern), any JSON object (json_object mode), a regex (an ISO date and time)
and a choice of four strings. Printed as a markdown table; never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.gguf_loader import open_gguf
from model.loader import smollm2_gguf_path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "orders": {"type": "array", "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "total": {"type": "number", "minimum": 0}, "paid": {"type": "boolean"}},
            "required": ["id", "total", "paid"], "additionalProperties": False}},
    },
    "required": ["name", "age", "email", "address", "tags", "orders"],
    "additionalProperties": False,
}
SCHEMA_DOC = json.dumps({
    "name": "Ada Lovelace", "age": 36, "email": "ada@engine.org",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "tags": ["admin", "user"],
    "orders": [{"id": 1, "total": 12.5, "paid": True}, {"id": 2, "total": 0, "paid": False},
               {"id": 3, "total": 1843.25, "paid": True}],
})
ANY_JSON_DOC = json.dumps({"title": "Notes", "items": [1, 2.5, "three", None, True, {"deep": {"deeper": []}}],
                           "text": "a longer string value with some words in it"})
REGEX = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?Z"
REGEX_DOC = "2026-11-29T16:31:05Z"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
CHOICE_DOC = "mixed feelings"


@dataclass
class Case:
    name: str
    kind: str      # json_schema | json_object | regex | choice
    spec: object
    document: str


CASES = [Case("nested JSON schema", "json_schema", SCHEMA, SCHEMA_DOC),
         Case("any JSON object", "json_object", None, ANY_JSON_DOC),
         Case("regex (date-time)", "regex", REGEX, REGEX_DOC),
         Case("choice of 4", "choice", CHOICES, CHOICE_DOC)]


class Matcher:
    """What the engine needs of a library's matcher: fill a mask row, advance by one token."""
    fill: Callable[[torch.Tensor], None]
    accept: Callable[[int], bool]


def regex_of_choices(choices: list[str]) -> str:
    import re
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, raw: list[bytes]):
        import xgrammar as xgr
        self.xgr = xgr
        vocab = [b"" if i in tok.special_token_ids else b for i, b in enumerate(raw)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(raw), stop_token_ids=sorted(tok.eos_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, case: Case):
        c = self.compiler
        if case.kind == "json_schema":
            return c.compile_json_schema(json.dumps(case.spec), any_whitespace=False)
        if case.kind == "json_object":
            return c.compile_builtin_json_grammar()
        return c.compile_regex(case.spec if case.kind == "regex" else regex_of_choices(case.spec))

    def matcher(self, compiled):
        m = self.xgr.GrammarMatcher(compiled)
        return lambda row: m.fill_next_token_bitmask(row.unsqueeze(0), 0), m.accept_token, m.is_terminated


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, raw: list[bytes]):
        import llguidance
        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=len(raw), eos_token=sorted(tok.eos_token_ids))

    def compile(self, case: Case):
        M = self.ll.LLMatcher
        if case.kind == "json_schema":
            grammar = M.grammar_from_json_schema(case.spec)
        elif case.kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"})
        else:
            grammar = M.grammar_from_regex(case.spec if case.kind == "regex" else regex_of_choices(case.spec))
        return grammar

    def matcher(self, compiled):
        m = self.ll.LLMatcher(self.tokenizer, compiled)  # builds the parser (its lexer grows lazily)
        if m.is_error():
            raise ValueError(m.get_error())
        return (lambda row: m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)), m.consume_token, m.is_stopped


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, raw: list[bytes]):
        import outlines_core
        self.oc = outlines_core
        eos = min(tok.eos_token_ids)
        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(raw):
            if i not in tok.special_token_ids:
                vocab.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, vocab)

    def compile(self, case: Case):
        from outlines_core.json_schema import build_regex_from_schema
        if case.kind == "json_schema":
            regex = build_regex_from_schema(json.dumps(case.spec))
        elif case.kind == "json_object":
            regex = build_regex_from_schema(json.dumps({"type": "object"}))
        else:
            regex = case.spec if case.kind == "regex" else regex_of_choices(case.spec)
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        g = self.oc.Guide(compiled)
        return (lambda row: g.write_mask_into(row.data_ptr(), row.numel(), 4)), (lambda t: g.advance(t, False) or True), \
            g.is_finished


LIBRARIES = [XGrammar, LLGuidance, OutlinesCore]


def measure(lib, tok, case: Case, repeats: int) -> dict:
    V = tok.vocab_size
    ids = tok.encode(case.document, add_special_tokens=False)
    started = time.perf_counter()
    try:
        compiled = lib.compile(case)
        lib.matcher(compiled)
    except Exception as exc:  # a library that cannot express the case
        return {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
    compile_s = time.perf_counter() - started  # grammar to a first matcher
    row = torch.empty((V + 31) // 32, dtype=torch.int32)
    fills, accepts, news = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fill, accept, _ = lib.matcher(compiled)
        news.append(time.perf_counter() - t0)
        for token in ids:
            t0 = time.perf_counter()
            fill(row)
            t1 = time.perf_counter()
            bit = (int(row[token // 32]) >> (token % 32)) & 1
            if not bit:
                return {"error": f"rejects token {token} {tok.decode([token])!r}", "compile_s": compile_s}
            ok = accept(token)
            t2 = time.perf_counter()
            if ok is False:
                return {"error": f"consume failed at {token}", "compile_s": compile_s}
            fills.append(t1 - t0)
            accepts.append(t2 - t1)
    return {"compile_s": compile_s, "tokens": len(ids), "fill_us": 1e6 * statistics.mean(fills),
            "fill_p99_us": 1e6 * sorted(fills)[int(0.99 * (len(fills) - 1))], "accept_us": 1e6 * statistics.mean(accepts),
            "new_us": 1e6 * statistics.median(news)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="walks of each document (the mask cost is their mean)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = open_gguf(smollm2_gguf_path()).tokenizer()
    raw = tok.token_bytes(range(tok.vocab_size))
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, vocab {tok.vocab_size}\n")
    print("| library | version | set-up (s) | grammar | compile (ms) | tokens | mask fill, mean (µs) | fill p99 (µs) "
          "| advance (µs) | new matcher (µs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cls in LIBRARIES:
        module = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines_core"}[cls.name]
        try:
            from importlib.metadata import version
            __import__(module)
            ver = version(cls.name)
        except ImportError:
            print(f"| {cls.name} | not installed | | | | | | | | |")
            continue
        started = time.perf_counter()
        lib = cls(tok, raw)
        setup_s = time.perf_counter() - started
        for case in CASES:
            r = measure(lib, tok, case, args.repeats)
            if "error" in r:
                print(f"| {cls.name} | {ver} | {setup_s:.2f} | {case.name} | {1e3 * r.get('compile_s', float('nan')):.0f} "
                      f"| | {r['error']} | | | |")
                continue
            print(f"| {cls.name} | {ver} | {setup_s:.2f} | {case.name} | {1e3 * r['compile_s']:.1f} | {r['tokens']} "
                  f"| {r['fill_us']:.0f} | {r['fill_p99_us']:.0f} | {r['accept_us']:.0f} | {r['new_us']:.0f} |")


if __name__ == "__main__":
    main()
