"""What a JSON schema costs the engine: SmolLM2 throughput with and without one, at c=8 and c=32.

    python -m benchmarks.structured_output [--concurrency 8,32] [--rounds 2] [--max-tokens 128]

Offline, on the real engine (max_num_seqs = c): `rounds * c` chat requests (varied prompts asking
for a JSON record), all submitted at once, greedy. "free": no constraint, ignore_eos and exactly
`--max-tokens` tokens each. "schema": the nested schema of benchmarks.grammar_libs
(json_schema, strict), ending when the grammar ends (or at --max-tokens). Throughput is output tokens
per second of wall time; "step" is the mean engine step time of decode steps (the fair per-token
comparison: the schema's requests end at different lengths, so their last steps run a smaller
batch). The first structured request's compile (and xgrammar's import) happens in a warm-up.
Every schema output is checked with jsonschema; the count that validated is printed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import jsonschema
import torch

from benchmarks.grammar_libs import SCHEMA
from model.dtypes import auto_dtype
from model.loader import load_model, smollm2_gguf_path
from model.sampling_params import SamplingParams, StructuredOutput
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.observer import EngineObserver

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


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = (f"Write a JSON record for {SUBJECTS[i % len(SUBJECTS)]}: name, age, email, address, tags "
               "and a list of orders.")
        text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def run(engine: Engine, ids: list[list[int]], params: SamplingParams) -> tuple[list[str], int, float]:
    async def one(i: int, p: list[int]) -> tuple[str, int]:
        text, tokens = [], 0
        async for out in engine.generate(p, params, f"r{time.monotonic_ns()}-{i}"):
            text.append(out.new_text)
            tokens += len(out.new_token_ids)
        return "".join(text), tokens

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))

    started = time.perf_counter()
    results = asyncio.run(main())
    return [t for t, _ in results], sum(n for _, n in results), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--rounds", type=int, default=2, help="requests per run = rounds x concurrency")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    dtype = auto_dtype("cpu")
    model, tok = load_model(smollm2_gguf_path(), dtype=dtype, progress=False)
    spec = StructuredOutput("json", json.dumps(SCHEMA), strict=True)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"SmolLM2-135M {str(dtype).removeprefix('torch.')}, greedy, max_tokens {args.max_tokens}\n")
    print("| c | requests | mode | output tokens | wall (s) | tok/s | decode step mean (ms) | schema-valid |")
    print("|---|---|---|---|---|---|---|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        steps = StepTimes()
        engine = Engine(model, tok, EngineConfig(kv_cache_memory=1 << 30, max_num_seqs=c, max_num_batched_tokens=2048),
                        observer=steps)
        engine.start()
        ids = prompts(tok, args.rounds * c)
        run(engine, ids[:1], SamplingParams(max_tokens=4, temperature=0, structured_output=spec))  # warm-up
        rates = {}
        for mode in ("free", "schema"):
            params = (SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True) if mode == "free" else
                      SamplingParams(max_tokens=args.max_tokens, temperature=0, structured_output=spec))
            steps.decode.clear()
            texts, tokens, wall = run(engine, ids, params)
            valid = "-"
            if mode == "schema":
                ok = 0
                for text in texts:
                    try:
                        jsonschema.validate(json.loads(text), SCHEMA)
                        ok += 1
                    except (ValueError, jsonschema.ValidationError):
                        pass
                valid = f"{ok}/{len(texts)}"
            step_ms = 1e3 * sum(steps.decode) / max(len(steps.decode), 1)
            rates[mode] = (tokens / wall, step_ms)
            print(f"| {c} | {len(ids)} | {mode} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | {step_ms:.1f} | {valid} |",
                  flush=True)
        engine.shutdown()
        free, schema = rates["free"], rates["schema"]
        print(f"| {c} | | schema / free | | | {schema[0] / free[0]:.2f}x | {schema[1] / free[1]:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
