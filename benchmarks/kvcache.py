"""KV cache benchmark: memory efficiency, paged decode attention speed, per-variant footprint.

    python -m benchmarks.kvcache [--parts memory,decode,variants] [--num-requests 200] ...

Prints markdown tables (for BENCHMARKS.md); nothing is asserted.
1. memory:   a seeded long-tailed workload (lognormal prompt and output lengths) driven through
             `KVCacheManager` by a minimal continuous-batching loop; tokens stored / token slots
             allocated, paged (blocks of block_size) vs a contiguous cache reserving max_model_len
             per running request, over the same schedule, at the peak and averaged over the steps.
2. decode:   one layer's decode attention for many sequences of a long context, SmolLM2 shapes
             (9 q heads, 3 kv heads, head_dim 64): `paged_flash_attention` (walks the pages) vs
             `paged_sdpa_attention` (gathers the pages, then SDPA), float32 and bfloat16.
3. variants: SmolLM2-135M as mha / gqa-3 / mqa in bfloat16 and float32 at a byte budget:
             bytes/token, capacity in tokens, concurrent sequences of 2k tokens that fit.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from kvcache.kv_cache import KVLayout, parse_bytes
from kvcache.manager import KVCacheManager
from model.config import PRESETS
from model.variants import parse_variant

SMOLLM2 = PRESETS["smollm2-135m"]
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


# --- 1. memory efficiency -----------------------------------------------------------------------

@dataclass(slots=True)
class _Request:
    seq_id: int
    tokens: list[int]
    output_len: int
    prompt_len: int


def long_tailed_workload(n: int, max_model_len: int, seed: int, prompt_median: float = 256,
                         output_median: float = 128, sigma: float = 1.0, vocab: int = 49152) -> list[_Request]:
    """Prompt and output lengths drawn from lognormals (median, sigma), clipped to max_model_len."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = min(max(1, round(rng.lognormvariate(0, sigma) * prompt_median)), max_model_len - 1)
        output = min(max(1, round(rng.lognormvariate(0, sigma) * output_median)), max_model_len - prompt)
        out.append(_Request(i, [rng.randrange(vocab) for _ in range(prompt)], output, prompt))
    return out


def simulate_memory(requests: list[_Request], *, num_blocks: int, block_size: int, max_model_len: int,
                    max_num_seqs: int, seed: int) -> dict[str, float]:
    """Run the workload step by step and measure, after every step, the tokens stored against the
    slots each scheme allocates for the same running requests.

    A request's last token is the one sampled by the previous step (the prompt's, on admission):
    each step allocates its slots, computes them (`cache_blocks`), then samples one more token.
    Prefill takes a whole prompt in one step; a shortage preempts the newest request (recompute).
    """
    kv = KVCacheManager(num_blocks, block_size)
    rng = random.Random(seed + 1)
    waiting, running = list(requests), []
    steps = preemptions = max_running = 0
    sum_stored = sum_paged = sum_contig = 0
    peak = (0, 1, 1, 0)  # (stored, paged slots, contiguous slots, running) at the most tokens stored
    while waiting or running:
        i, preempted = 0, False
        while i < len(running):
            req = running[i]
            if kv.allocate_slots(req.seq_id, len(req.tokens)):
                i += 1
                continue
            victim = running.pop()  # outputs kept; its blocks stay cached for the re-admission
            kv.free(victim.seq_id)
            waiting.insert(0, victim)
            preemptions += 1
            preempted = True
        while waiting and len(running) < max_num_seqs and not preempted:
            req = waiting[0]
            blocks, hit = kv.get_computed_blocks(req.tokens)
            if not kv.allocate_slots(req.seq_id, len(req.tokens), blocks):
                break
            kv.record_prefix_lookup(len(req.tokens), hit)
            running.append(waiting.pop(0))
        if not running:
            raise RuntimeError(f"a request of {len(waiting[0].tokens)} tokens does not fit in {num_blocks} blocks")
        for req in running:
            kv.cache_blocks(req.seq_id, req.tokens, len(req.tokens))
        stats = kv.stats()
        paged = stats.stored_tokens + stats.empty_slots
        contig = len(running) * max_model_len
        sum_stored += stats.stored_tokens
        sum_paged += paged
        sum_contig += contig
        if stats.stored_tokens > peak[0]:
            peak = (stats.stored_tokens, paged, contig, len(running))
        steps += 1
        max_running = max(max_running, len(running))
        for req in list(running):
            req.tokens.append(rng.randrange(49152))
            if len(req.tokens) - req.prompt_len >= req.output_len:
                running.remove(req)
                kv.free(req.seq_id)
    return {
        "steps": steps, "preemptions": preemptions, "max_running": max_running,
        "peak_running": peak[3], "peak_stored": peak[0],
        "peak_paged": peak[0] / peak[1], "peak_contig": peak[0] / peak[2],
        "avg_paged": sum_stored / sum_paged, "avg_contig": sum_stored / sum_contig,
    }


def report_memory(args) -> None:
    layout = KVLayout(SMOLLM2.n_layers, SMOLLM2.n_kv_heads, SMOLLM2.head_dim, 2, args.block_size)
    budget = parse_bytes(args.kv_memory)
    num_blocks = layout.num_blocks(budget) + 1  # the manager counts the null block too
    requests = long_tailed_workload(args.num_requests, args.max_model_len, args.seed)
    prompts = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    r = simulate_memory(requests, num_blocks=num_blocks, block_size=args.block_size,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, seed=args.seed)
    print(f"### Memory efficiency: {args.num_requests} requests, lognormal lengths (seed {args.seed})\n")
    print(f"prompt tokens median {statistics.median(prompts):.0f} / mean {statistics.mean(prompts):.0f} / "
          f"max {max(prompts)}; output tokens median {statistics.median(outputs):.0f} / mean "
          f"{statistics.mean(outputs):.0f} / max {max(outputs)}; max_model_len {args.max_model_len}; "
          f"pool {num_blocks - 1} blocks of {args.block_size} ({args.kv_memory} of SmolLM2 gqa-3 bfloat16); "
          f"max_num_seqs {args.max_num_seqs}; {r['steps']} steps, {r['preemptions']} preemptions; "
          f"peak {r['peak_stored']} tokens stored by {r['peak_running']} running sequences.\n")
    print("| cache | stored / allocated at peak | averaged over the run |")
    print("|---|---:|---:|")
    print(f"| paged, block {args.block_size} | {r['peak_paged']:.4f} | {r['avg_paged']:.4f} |")
    print(f"| contiguous, max_model_len {args.max_model_len} | {r['peak_contig']:.4f} | {r['avg_contig']:.4f} |")
    print(f"\nThe contiguous row is measured over the same schedule, which a contiguous cache of this budget "
          f"could not run: it holds {layout.capacity_tokens(budget) // args.max_model_len} sequences at once, "
          f"the paged pool ran up to {r['max_running']} (max_num_seqs {args.max_num_seqs}) with "
          f"{r['preemptions']} preemptions.")
    print()


# --- 2. decode attention ------------------------------------------------------------------------

def report_decode(args) -> None:
    import torch

    from kvcache.metadata import PagedMetadata
    from model.paged_attention import paged_flash_attention, paged_sdpa_attention
    from model.paged_plan import PagedPlan

    ctx, bs = args.decode_context, args.block_size
    Hq, Hkv, D = SMOLLM2.n_heads, SMOLLM2.n_kv_heads, SMOLLM2.head_dim
    pages = -(-ctx // bs)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"### Decode attention: sequences x {ctx} tokens of context, one layer, "
          f"Hq {Hq} / Hkv {Hkv} / D {D}, block {bs}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; the step's plan built outside the timing "
          f"(once per step for all layers)\n")
    print("| sequences | dtype | paged flash (ms) | gather + sdpa (ms) | flash / sdpa | max abs diff |")
    print("|---:|---|---:|---:|---:|---:|")
    for S in (int(x) for x in str(args.decode_seqs).split(",")):
        # Pages scattered over the pool, as a long-running server leaves them.
        order = (torch.randperm(S * pages, generator=gen) + 1).tolist()
        tables = [order[s * pages:(s + 1) * pages] for s in range(S)]
        meta = PagedMetadata.build(query_lens=[1] * S, context_lens=[ctx] * S, block_tables=tables,
                                   block_size=bs, device=args.device)
        for name in ("float32", "bfloat16"):
            dtype = getattr(torch, name)
            k_cache = torch.randn(S * pages + 1, Hkv, bs, D, generator=gen).to(args.device, dtype)  # (blocks, Hkv, bs, D)
            v_cache = torch.randn(S * pages + 1, Hkv, bs, D, generator=gen).to(args.device, dtype)
            q = torch.randn(S, Hq, D, generator=gen).to(args.device, dtype)  # (S, Hq, D)
            times, outs = {}, {}
            for impl, fn, tile in (("flash", paged_flash_attention, "default"), ("sdpa", paged_sdpa_attention, None)):
                kw = {} if tile == "default" else {"decode_tile_tokens": tile}
                plan = PagedPlan.build(meta, n_kv_heads=Hkv, group=Hq // Hkv, dtype=dtype, **kw)
                outs[impl] = _time(fn, (q, k_cache, v_cache, plan), args.repeats, args.device, times, impl)
            diff = (outs["flash"].float() - outs["sdpa"].float()).abs().max().item()
            print(f"| {S} | {name} | {times['flash']:.3f} | {times['sdpa']:.3f} | {times['flash'] / times['sdpa']:.2f} "
                  f"| {diff:.1e} |")
    print()


def _time(fn, fn_args, repeats: int, device: str, into: dict, name: str):
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        out = fn(*fn_args)  # warm-up
        samples = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(*fn_args)
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
    into[name] = statistics.median(samples)
    return out


# --- 3. footprint per variant -------------------------------------------------------------------

def report_variants(args) -> None:
    budget = parse_bytes(args.kv_memory)
    seq_blocks = -(-args.seq_len // args.block_size)
    print(f"### KV footprint per variant: SmolLM2-135M ({SMOLLM2.n_layers} layers, {SMOLLM2.n_heads} q heads, "
          f"head_dim {SMOLLM2.head_dim}), budget {args.kv_memory} = {budget} bytes, block {args.block_size}\n")
    print(f"| variant | n_kv_heads | dtype | bytes/token | bytes/block | num_blocks | capacity (tokens) | "
          f"{args.seq_len}-token sequences |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for variant in ("mha", "gqa-3", "mqa"):
        n_kv = parse_variant(variant, SMOLLM2.n_heads, SMOLLM2.n_kv_heads)
        for dtype, nbytes in DTYPE_BYTES.items():
            layout = KVLayout(SMOLLM2.n_layers, n_kv, SMOLLM2.head_dim, nbytes, args.block_size)
            usable = layout.num_blocks(budget)
            print(f"| {variant} | {n_kv} | {dtype} | {layout.bytes_per_token:,} | {layout.bytes_per_block:,} | "
                  f"{layout.num_blocks(budget):,} | {layout.capacity_tokens(budget):,} | {usable // seq_blocks:,} |")
    print()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvcache", description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="memory,decode,variants", help="comma-separated: memory, decode, variants")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-memory", default="1GiB", help="KV byte budget, e.g. 1GiB, 512MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-seqs", default="32", help="decoding sequences, or a comma list (1,8,32)")
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the 'fit' column of variants")
    args = p.parse_args(argv)
    try:
        seqs = [int(x) for x in args.decode_seqs.split(",")]
    except ValueError:
        p.error(f"--decode-seqs={args.decode_seqs!r}: give a number or a comma list of numbers, e.g. 1,8,32")
    for name, value, low in (("num-requests", args.num_requests, 1), ("max-model-len", args.max_model_len, 2),
                             ("max-num-seqs", args.max_num_seqs, 1), ("block-size", args.block_size, 1),
                             ("decode-seqs", min(seqs), 1), ("decode-context", args.decode_context, 1),
                             ("repeats", args.repeats, 1), ("seq-len", args.seq_len, 1)):
        if value < low:
            p.error(f"--{name}={value} is out of range: must be >= {low}")
    parts = {"memory": report_memory, "decode": report_decode, "variants": report_variants}
    chosen = [s.strip() for s in args.parts.split(",") if s.strip()]
    for name in chosen:
        if name not in parts:
            p.error(f"--parts: unknown part {name!r}; choose from {', '.join(parts)}")
    for name in chosen:
        parts[name](args)


if __name__ == "__main__":
    main()
