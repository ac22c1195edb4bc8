"""torch threads sized to the CPUs a process may use (service.threads) against naive threading.

Each scenario runs in a fresh process (`--worker`): SmolLM2-135M float32, each engine given
`--requests` requests of 64 prompt tokens and `--max-tokens` new tokens (ignore_eos) at once, after
a warm-up request; it reports output tokens/s over all engines and the median decode step.
Scenarios, each "kvserve default" (what `kvserve serve` picks with no --threads / OMP_NUM_THREADS)
against the naive choice:
- a CPU quota of 1 CPU on this machine's cores (a cgroup made here: v1 cpu.cfs_quota_us or v2
  cpu.max; needs root): torch's default sizes its pool from the cores and ignores the quota;
- `taskset -c 0` (affinity 1 CPU) against 2 threads forced onto it (OMP_NUM_THREADS set to the
  node's cores, a common copy-paste);
- no limit: the CPUs against 4x as many threads (oversubscription);
- two engines (two variants) busy at once: split (CPUs / 2 each) against torch's default in each.
Prints a markdown table; what cannot be measured here (no cgroup, one CPU) is said in place.
Nothing is asserted by a test.

    python -m benchmarks.threads
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
BENCH_CGROUP = "kvserve-bench-threads"


# ---------------------------------------------------------------------------------- worker --

def worker(args) -> dict:
    import torch

    from model.loader import load_base
    from model.sampling_params import SamplingParams
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.observer import EngineObserver
    from service.threads import cpu_limit, plan_threads

    class DecodeSteps(EngineObserver):
        def __init__(self):
            self.decode: list[float] = []

        def on_step(self, *, phase, duration_s, num_tokens, num_seqs):
            if phase == "decode":
                self.decode.append(duration_s)

    plan = plan_threads(None, args.engines)  # what kvserve serve would pick here
    if args.threads == "auto":
        per_engine, total = plan.per_engine, plan.total
    elif args.threads == "torch":
        per_engine, total = None, torch.get_num_threads()
    else:
        per_engine = total = int(args.threads)
    torch.set_num_threads(total)
    model, tokenizer = load_base(args.model, dtype=torch.float32, progress=False)
    observers = [DecodeSteps() for _ in range(args.engines)]
    engines = [Engine(model, tokenizer, EngineConfig(kv_cache_memory=256 << 20, num_threads=per_engine),
                      name=f"e{i}", observer=observers[i]) for i in range(args.engines)]
    for e in engines:
        e.start()
    prompt = [3 + i % 250 for i in range(64)]  # 64 ids valid in every vocabulary here

    async def one(engine, rid, max_tokens):
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), rid):
            pass

    async def run(n, max_tokens, tag):
        await asyncio.gather(*(one(e, f"{tag}-{e.name}-{i}", max_tokens) for e in engines for i in range(n)))

    asyncio.run(run(1, 4, "warm"))
    for o in observers:
        o.decode.clear()
    started, cpu0 = time.perf_counter(), time.process_time()
    asyncio.run(run(args.requests, args.max_tokens, "run"))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    for e in engines:
        e.shutdown(timeout=30)
    steps = [d for o in observers for d in o.decode]
    limit = cpu_limit()
    return {"threads_per_engine": per_engine if per_engine is not None else torch.get_num_threads(),
            "detected_default": plan.per_engine, "affinity": limit.affinity, "quota": limit.quota,
            "tok_s": args.engines * args.requests * args.max_tokens / wall, "wall_s": wall, "cpu_s": cpu,
            "decode_step_ms_p50": 1000 * statistics.median(steps)}


# ---------------------------------------------------------------------------------- driver --

def make_quota_cgroup(cpus: float) -> Path | None:
    """A cgroup with a CPU quota of `cpus`, or None where none can be made (not root, no controller)."""
    period = 100_000
    try:
        if (CGROUP_V2 / "cgroup.controllers").exists() and "cpu" in (CGROUP_V2 / "cgroup.subtree_control").read_text():
            path = CGROUP_V2 / BENCH_CGROUP
            path.mkdir(exist_ok=True)
            (path / "cpu.max").write_text(f"{int(cpus * period)} {period}")
            return path
        if (CGROUP_V1 / "cpu.cfs_quota_us").exists():
            path = CGROUP_V1 / BENCH_CGROUP
            path.mkdir(exist_ok=True)
            (path / "cpu.cfs_period_us").write_text(str(period))
            (path / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
            return path
    except OSError as exc:
        print(f"(no cgroup: {exc})", file=sys.stderr)
    return None


def spawn(args, threads: str, engines: int, *, taskset: str | None = None, cgroup: Path | None = None,
          omp: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.threads", "--worker", "--threads", threads, "--engines", str(engines),
           "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--model", args.model]
    if taskset:
        cmd = [shutil.which("taskset") or "taskset", "-c", taskset, *cmd]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as kvserve serve sets it
    if omp:
        env["OMP_NUM_THREADS"] = omp

    def join_cgroup():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=join_cgroup)
    if out.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--engines", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=8, help="requests per engine")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch
    cpus = len(os.sched_getaffinity(0))
    print(f"machine: {cpus} CPUs in the affinity mask, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.model} float32, {args.requests} requests of 64 prompt "
          f"tokens x {args.max_tokens} new tokens per engine\n")
    print("| scenario | threads | per engine | output tok/s | decode step p50 (ms) | CPU s / wall s |")
    print("|---|---|---:|---:|---:|---:|")

    def row(scenario, label, r):
        print(f"| {scenario} | {label} | {r['threads_per_engine']} | {r['tok_s']:.1f} | {r['decode_step_ms_p50']:.1f} "
              f"| {r['cpu_s']:.1f} / {r['wall_s']:.1f} |", flush=True)

    cgroup = make_quota_cgroup(1.0) if cpus >= 2 else None
    if cgroup is None:
        print("| CPU quota 1 on more cores | not measurable here (needs root and a cgroup CPU controller, and 2+ CPUs) | | | | |")
    else:
        try:
            r = spawn(args, "auto", 1, cgroup=cgroup)
            row(f"CPU quota 1 CPU on {cpus} cores", f"kvserve default (detected: affinity {r['affinity']}, quota "
                f"{r['quota']:g})", r)
            row(f"CPU quota 1 CPU on {cpus} cores", "torch default (ignores the quota)", spawn(args, "torch", 1, cgroup=cgroup))
        finally:
            cgroup.rmdir()
    if cpus >= 2:
        row("taskset -c 0", "kvserve default", spawn(args, "auto", 1, taskset="0"))
        row("taskset -c 0", "OMP_NUM_THREADS=2 (the node's cores)", spawn(args, "torch", 1, taskset="0", omp="2"))
    row(f"{cpus} CPUs, no limit", "kvserve default", spawn(args, "auto", 1))
    row(f"{cpus} CPUs, no limit", f"{4 * cpus} threads (oversubscribed)", spawn(args, str(4 * cpus), 1))
    row("2 engines busy at once", "kvserve default (split)", spawn(args, "auto", 2))
    row("2 engines busy at once", "torch default in each", spawn(args, "torch", 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
