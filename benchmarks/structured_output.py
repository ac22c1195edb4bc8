"""What a JSON schema costs the engine: SmolLM2 throughput with and without one, at c=8 and c=32.

    python -m benchmarks.structured_output [--concurrency 8,32] [--rounds 2] [--max-tokens 320]

Offline, on the real engine (max_num_seqs = c): `rounds * c` chat requests (varied prompts asking
for a JSON record), all submitted at once, greedy. "schema" runs first: every request constrained
by SCHEMA below (json_schema, strict), ending when the grammar ends. SCHEMA bounds every string
(maxLength, or a pattern with bounded repeats) and every array (maxItems) and uses integers with
bounds, so each document is finite and --max-tokens is far above its longest form: every output
completes and is checked with jsonschema (the count that validated is printed). "free" then runs
the same prompts unconstrained with ignore_eos, each request exactly as many tokens as its schema
run produced: both runs do the same work step for step (same batch sizes as requests finish), so
the difference is what the constraint costs. Throughput is output tokens per second of wall time;
"step" is the mean engine step time of decode steps. For the schema run the columns also split out
the grammar work per decode step: mask fill (xgrammar's next-token bitmask, on the engine thread),
mask apply (in the sampler) and advance (feeding each sampled token to its matcher). The first
structured request's compile (and xgrammar's import) happens in a warm-up, reported on its own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import torch

import model.sampler
from model.dtypes import auto_dtype, cpu_summary
from model.loader import load_model, smollm2_gguf_path
from model.quantization import QUANTIZATIONS
from model.sampling_params import SamplingParams, StructuredOutput
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.observer import EngineObserver
from service.engine.structured_output import GuardedMatcher

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.[a-z]{2,3}$"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "minLength": 1, "maxLength": 32},
                           "city": {"type": "string", "minLength": 1, "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "orders": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                           "total": {"type": "integer", "minimum": 0, "maximum": 99999},
                           "paid": {"type": "boolean"}},
            "required": ["id", "total", "paid"], "additionalProperties": False}},
    },
    "required": ["name", "age", "email", "address", "tags", "orders"],
    "additionalProperties": False,
}
SUBJECTS = ["a librarian in Oslo", "a retired pilot", "a chess coach", "a baker in Lyon", "a marine biologist",
            "a taxi driver in Lima", "a violin maker", "a nurse in Nairobi", "a software tester", "a beekeeper",
            "a museum guard", "a ski instructor", "a florist in Kyoto", "a tram driver", "a glass blower",
            "a park ranger", "a sushi chef", "a wind farm engineer", "a choir director", "a lighthouse keeper"]


class StepTimes(EngineObserver):
    def __init__(self) -> None:
        self.decode: list[float] = []

    def on_step(self, *, phase: str, duration_s: float, num_tokens: int, num_seqs: int) -> None:
        if phase == "decode":
            self.decode.append(duration_s)


class Timer:
    """Total seconds spent in the functions `wrap` times (called on the engine thread only)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


FILL, APPLY, ADVANCE = Timer(), Timer(), Timer()


def time_grammar_work() -> None:
    """Route the three grammar steps of a decode step through the timers (this process only)."""
    Engine._token_masks = FILL.wrap(Engine._token_masks)  # type: ignore[method-assign]
    model.sampler.apply_token_masks = APPLY.wrap(model.sampler.apply_token_masks)
    GuardedMatcher.accept_token = ADVANCE.wrap(GuardedMatcher.accept_token)  # type: ignore[method-assign]


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = (f"Write a JSON record for {SUBJECTS[i % len(SUBJECTS)]}: name, age, email, address, tags "
               "and a list of orders.")
        text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def run(engine: Engine, ids: list[list[int]], params: list[SamplingParams]) -> tuple[list[str], list[int], float]:
    """Every request submitted at once: (texts, output tokens per request, wall seconds)."""
    async def one(i: int, p: list[int], sp: SamplingParams) -> tuple[str, int]:
        text, tokens = [], 0
        async for out in engine.generate(p, sp, f"r{time.monotonic_ns()}-{i}"):
            text.append(out.new_text)
            tokens += len(out.new_token_ids)
        return "".join(text), tokens

    async def main():
        return await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in enumerate(zip(ids, params))))

    started = time.perf_counter()
    results = asyncio.run(main())
    return [t for t, _ in results], [n for _, n in results], time.perf_counter() - started


def count_valid(texts: list[str]) -> int:
    ok = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--rounds", type=int, default=2, help="requests per run = rounds x concurrency")
    parser.add_argument("--max-tokens", type=int, default=320, help="a cap far above SCHEMA's longest document")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="auto", help="as `kvserve serve` (default: auto)")
    args = parser.parse_args()
    time_grammar_work()
    dtype = auto_dtype("cpu")
    model_, tok = load_model(smollm2_gguf_path(), dtype=dtype, quantization=args.quantization, progress=False)
    spec = StructuredOutput("json", json.dumps(SCHEMA), strict=True)
    print(f"CPU: {cpu_summary()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"SmolLM2-135M {str(dtype).removeprefix('torch.')}, weights {model_.weights}, greedy, "
          f"schema max_tokens {args.max_tokens}\n")
    print("| c | requests | mode | output tokens | wall (s) | tok/s | decode step mean (ms) | schema-valid "
          "| mask fill (ms/step) | mask apply (ms/step) | advance (ms/step) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        steps = StepTimes()
        engine = Engine(model_, tok, EngineConfig(kv_cache_memory=1 << 30, max_num_seqs=c, max_num_batched_tokens=2048),
                        observer=steps)
        engine.start()
        ids = prompts(tok, args.rounds * c)
        warm = time.perf_counter()
        run(engine, ids[:1], [SamplingParams(max_tokens=4, temperature=0, structured_output=spec)])
        print(f"<!-- c={c} warm-up with the first structured request (import + compile): "
              f"{time.perf_counter() - warm:.2f} s -->", flush=True)
        rates = {}
        lengths: list[int] = []
        for mode in ("schema", "free"):
            if mode == "schema":
                params = [SamplingParams(max_tokens=args.max_tokens, temperature=0, structured_output=spec)] * len(ids)
            else:
                params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
            steps.decode.clear()
            for timer in (FILL, APPLY, ADVANCE):
                timer.seconds = 0.0
            texts, lengths, wall = run(engine, ids, params)
            tokens = sum(lengths)
            valid = f"{count_valid(texts)}/{len(texts)}" if mode == "schema" else "-"
            n_steps = max(len(steps.decode), 1)
            step_ms = 1e3 * sum(steps.decode) / n_steps
            grammar = " | ".join(f"{1e3 * t.seconds / n_steps:.2f}" if mode == "schema" else "-"
                                 for t in (FILL, APPLY, ADVANCE))
            rates[mode] = (tokens / wall, step_ms)
            print(f"| {c} | {len(ids)} | {mode} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | {step_ms:.1f} | {valid} "
                  f"| {grammar} |", flush=True)
        engine.shutdown()
        free, schema = rates["free"], rates["schema"]
        print(f"| {c} | | schema / free | | | {schema[0] / free[0]:.3f}x | {schema[1] / free[1]:.3f}x | | | | |",
              flush=True)


if __name__ == "__main__":
    main()
