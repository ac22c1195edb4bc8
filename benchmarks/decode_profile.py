"""Where a decode step's time goes: SmolLM2-135M, torch.profiler, per-op tables at several batch sizes.

    python -m benchmarks.decode_profile [--batch 1,8,32] [--context 200] [--quantization auto]
                                       [--attention auto] [--dtype auto] [--steps 5] [--top 12]

For each batch size S: S sequences of `context` random tokens are prefilled into a paged KV cache
(block 16, pages shuffled as a busy server leaves them), then `steps` decode steps run the paged
forward and the LM head for the S last tokens, as the engine's runner does (no sampling). Prints
the median step time and, from torch.profiler over the same steps, the ops that take the most
self CPU time (per step) with their call counts. Works on older checkouts too (it only passes
`quantization` where load_model takes it), which is how BENCHMARKS.md's "before" tables came out.
Not asserted anywhere; the numbers depend on the machine (its CPU flags are printed).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvcache.kv_cache import KVCache, KVLayout
from kvcache.metadata import PagedMetadata
from model.dtypes import auto_dtype, cpu_summary
from model.loader import load_model

BLOCK = 16


def load(args):
    kwargs = {"dtype": args.dtype, "attention": args.attention, "progress": False}
    if "quantization" in inspect.signature(load_model).parameters:
        kwargs["quantization"] = args.quantization
    model, _ = load_model("smollm2-135m", **kwargs)
    return model


class Batch:
    """S sequences with shuffled block tables, prefilled to `context` tokens."""

    def __init__(self, model, S: int, context: int, steps: int, seed: int):
        rng = random.Random(seed)
        pages = -(-(context + steps + 1) // BLOCK)
        cfg = model.config
        layout = KVLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.finfo(model.dtype).bits // 8, BLOCK)
        self.cache = KVCache.for_model(cfg, budget_bytes=S * pages * layout.bytes_per_block, block_size=BLOCK,
                                       dtype=model.dtype, device="cpu")
        free = list(range(1, self.cache.num_blocks))
        rng.shuffle(free)
        self.tables = [free[s * pages:(s + 1) * pages] for s in range(S)]
        self.lens = [0] * S
        self.model, self.S, self.rng = model, S, rng
        for s in range(S):  # one prefill per sequence keeps the prefill's memory small
            self._run([s], context)

    def _run(self, seqs: list[int], n_new: int) -> torch.Tensor:
        meta = PagedMetadata.build(query_lens=[n_new] * len(seqs), context_lens=[self.lens[s] + n_new for s in seqs],
                                   block_tables=[self.tables[s] for s in seqs], block_size=BLOCK)
        ids = torch.tensor([self.rng.randrange(self.model.config.vocab_size) for _ in range(n_new * len(seqs))])
        rows = torch.arange(n_new - 1, n_new * len(seqs), n_new)
        with torch.inference_mode():
            logits = self.model(ids, kv_cache=self.cache, meta=meta, logits_indices=rows)
        for s in seqs:
            self.lens[s] += n_new
        return logits

    def decode(self) -> torch.Tensor:
        return self._run(list(range(self.S)), 1)


def profile_batch(model, S: int, args) -> tuple[float, str]:
    batch = Batch(model, S, args.context, 2 * args.steps + 1, args.seed)
    batch.decode()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch.decode()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            batch.decode()
    stats = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in stats) / args.steps / 1e3
    lines = ["| op | ms / step | calls / step | share |", "|---|---:|---:|---:|"]
    for e in stats[:args.top]:
        ms = e.self_cpu_time_total / args.steps / 1e3
        lines.append(f"| `{e.key}` | {ms:.2f} | {e.count / args.steps:.0f} | {ms / total:.0%} |")
    calls = sum(e.count for e in stats) / args.steps
    lines.append(f"| all ops ({calls:.0f} calls) | {total:.2f} | | |")
    return statistics.median(times) * 1e3, "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--context", type=int, default=200, help="tokens already in each sequence's cache")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--attention", default="auto", help="as `kvserve serve` (default: auto)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.dtype == "auto":
        args.dtype = auto_dtype("cpu")
    model = load(args)
    weights = getattr(model, "weights", "dense (checkout without --quantization)")
    if not isinstance(weights, str):
        weights = "dense (checkout without --quantization)"
    print(f"### Decode step profile: SmolLM2-135M {args.dtype}, attention {args.attention}, weights: {weights}; "
          f"context {args.context} tokens, {args.steps} steps; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {cpu_summary()}\n")
    summary = []
    for S in (int(x) for x in args.batch.split(",")):
        step_ms, table = profile_batch(model, S, args)
        summary.append((S, step_ms))
        print(f"#### batch {S}: {step_ms:.1f} ms per step (median), {S / step_ms * 1e3:.1f} tokens/s\n")
        print(table, "\n", flush=True)
    print("| batch | ms / step | tokens / s |\n|---:|---:|---:|")
    for S, ms in summary:
        print(f"| {S} | {ms:.1f} | {S / ms * 1e3:.1f} |")


if __name__ == "__main__":
    main()
