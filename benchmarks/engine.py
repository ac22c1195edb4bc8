"""Offline engine throughput: continuous batching vs one request at a time (printed, never asserted).

    python -m benchmarks.engine [--num-requests 64] [--prompt-len 128] [--output-len 128]

SmolLM2-135M-Instruct, random 128-token prompts, 128 new tokens each (ignore_eos), all submitted
at once, at max_num_seqs 1, 8, 32, 64; then the baseline a user would otherwise write:
transformers' `generate` over the same GGUF, one request at a time, in the same run (float32, the
dtype transformers recommends for GGUF on CPU).
Rates are output tokens per second; the slow configurations run a subset of the requests
(--serial-requests), which is fair because a serial rate does not depend on how many run.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time

import torch

from model.dtypes import auto_dtype
from model.loader import load_model, smollm2_gguf_path
from model.quantization import QUANTIZATIONS
from model.sampling_params import SamplingParams
from service.engine.config import EngineConfig
from service.engine.engine import Engine


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def run_engine(model, tokenizer, prompts, output_len: int, max_num_seqs: int, kv_memory: int) -> dict:
    cfg = EngineConfig(kv_cache_memory=kv_memory, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    engine = Engine(model, tokenizer, cfg)
    engine.start()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    async def one(i, prompt):
        ttft = None
        async for out in engine.generate(prompt, params, f"r{i}"):
            if ttft is None and out.new_token_ids:
                ttft = out.time - out.arrival_time
        return out.completion_tokens, ttft

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    start = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - start
    engine.shutdown()
    tokens = sum(n for n, _ in results)
    ttfts = sorted(t for _, t in results)
    return {"requests": len(prompts), "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": ttfts[len(ttfts) // 2], "preemptions": engine.scheduler.num_preemptions}


def run_transformers(prompts, output_len: int) -> dict:
    """float32: what transformers itself recommends for a GGUF checkpoint on CPU."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                              min_new_tokens=output_len, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--serial-requests", type=int, default=8, help="requests for max_num_seqs=1 and the baseline")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", default="1,8,32,64")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto = what `kvserve serve --dtype auto` picks on this machine")
    p.add_argument("--attention", choices=("auto", "kernel", "flash", "sdpa", "naive"), default="auto")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="auto", help="as `kvserve serve` (default: auto)")
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.dtype == "auto":
        args.dtype = auto_dtype("cpu")
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model("smollm2-135m", dtype=dtype, attention=args.attention,
                                  quantization=args.quantization, progress=False)
    prompts = make_prompts(args.num_requests, args.prompt_len, model.config.vocab_size, args.seed)
    run_engine(model, tokenizer, prompts[:2], 4, 2, args.kv_cache_memory)  # warm-up
    rows = []
    for seqs in (int(s) for s in args.max_num_seqs.split(",")):
        subset = prompts[:args.serial_requests] if seqs == 1 else prompts
        r = run_engine(model, tokenizer, subset, args.output_len, seqs, args.kv_cache_memory)
        rows.append((f"kvserve max_num_seqs={seqs}", r))
        print(f"max_num_seqs={seqs}: {r['tok_s']:.1f} tok/s over {r['requests']} requests", flush=True)
    if not args.skip_baseline:
        r = run_transformers(prompts[:args.serial_requests], args.output_len)
        rows.append(("transformers generate (float32), one at a time", r))
        print(f"transformers: {r['tok_s']:.1f} tok/s", flush=True)

    base_seq1 = next((r["tok_s"] for name, r in rows if name.endswith("max_num_seqs=1")), None)
    base_hf = rows[-1][1]["tok_s"] if not args.skip_baseline else None
    print(f"\nSmolLM2-135M {args.dtype}, attention {args.attention}, prompts {args.prompt_len} tokens, "
          f"{args.output_len} new tokens each (ignore_eos), torch threads {torch.get_num_threads()}\n")
    print("| configuration | requests | output tokens/s | vs max_num_seqs=1 | vs transformers | TTFT p50 (s) | preemptions |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        ratio1 = f"{r['tok_s'] / base_seq1:.2f}x" if base_seq1 else "-"
        ratio_hf = f"{r['tok_s'] / base_hf:.2f}x" if base_hf else "-"
        ttft = f"{r['ttft_p50']:.2f}" if "ttft_p50" in r else "-"
        print(f"| {name} | {r['requests']} | {r['tok_s']:.1f} | {ratio1} | {ratio_hf} | {ttft} | {r.get('preemptions', '-')} |")


if __name__ == "__main__":
    main()
