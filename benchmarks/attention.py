"""Attention benchmark: time and peak memory of naive, flash and sdpa for causal prefill.

    python -m benchmarks.attention [--seq-lens 512,1024,2048,4096,8192] [--dtypes float32,bfloat16]
                                   [--impls naive,flash,sdpa] [--repeats 3] [--threads N] [--json PATH]
                                   [--omp-wait-policy PASSIVE|ACTIVE|inherit] [--heads 9 --kv-heads 3 --head-dim 64]
                                   [--backward]

SmolLM2-135M's attention shape by default: 9 query heads, 3 K/V heads, head_dim 64, batch 1,
Tq = Tk = T. Prints markdown tables (for BENCHMARKS.md); nothing is asserted. With `--backward`
one call is forward + backward (`torch.autograd.grad` of q, k, v for an all-ones output gradient):
training's cost, where naive autograd keeps T x T matrices and flash keeps row statistics.

Every (dtype, T, implementation) runs in a fresh subprocess, so no case inherits another's
allocator state, and memory is measured two ways there:
- torch peak: the profiler's allocation events (`profile_memory=True`) replayed in time order;
  the running sum's maximum is the peak of bytes held by tensors torch allocated during one call
  (its temporaries and its output, not the inputs). Exact, but blind to memory outside torch's
  allocator (e.g. MKL's own scratch).
- RSS peak: ru_maxrss after one call minus the resident set just before it (inputs built, one
  small warm-up call made). Sees everything the process touched, at page granularity; it
  overstates the call when the process's earlier high-water mark sat above its resident set
  (that floor is kept as rss_floor_bytes in --json) and understates memory reused from malloc's
  free lists; agreement with the torch column is the check that neither happened.
Time is the median wall clock of --repeats calls after those two, with process CPU time beside
it: on a shared machine the CPU time is the steadier number.

Cases run with OMP_WAIT_POLICY=PASSIVE unless told otherwise. Under GNU OpenMP's default (threads
spin at each barrier), any other runnable process on a small machine can make every parallel
region cost a scheduler time slice; flash makes thousands of torch calls where sdpa makes one
fused call, and measured 15-20x slower than sdpa at T >= 4096 that way on the 2-core development
machine at load average 2-5 (1.0-1.6x with PASSIVE). `--omp-wait-policy inherit` measures the
environment as it is.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("naive", "flash", "sdpa")
MiB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _torch_peak_bytes(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without the kineto results API: report the column as n/a
        return None
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def _call(impl: str, backward: bool):
    """One call of `impl` on (q, k, v): the forward, or forward + backward for an all-ones output gradient."""
    import torch

    from model.attention import ATTENTION_IMPLS
    fn = ATTENTION_IMPLS[impl]
    if not backward:
        return lambda q, k, v: fn(q, k, v, causal=True)
    return lambda q, k, v: torch.autograd.grad(fn(q, k, v, causal=True), (q, k, v), torch.ones_like(q))


def run_case(impl: str, seq_len: int, dtype_name: str, heads: int, kv_heads: int, head_dim: int,
             repeats: int, threads: int | None, backward: bool = False) -> dict:
    """One measurement, in this process (the parent calls it through a subprocess)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    fn, dtype = _call(impl, backward), getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seq_len)
    q, k, v = (torch.randn(1, h, seq_len, head_dim, generator=gen).to(dtype).requires_grad_(backward)
               for h in (heads, kv_heads, kv_heads))
    small = [t[:, :, :64].detach().contiguous().requires_grad_(backward) for t in (q, k, v)]
    fn(*small)  # load kernels and thread pools outside the measurement
    gc.collect()
    rss_before, maxrss_before = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn(q, k, v)
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch_peak = _torch_peak_bytes(lambda: fn(q, k, v))
    walls, cpus = [], []
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn(q, k, v)
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return {"impl": impl, "seq_len": seq_len, "dtype": dtype_name, "threads": torch.get_num_threads(),
            "backward": backward,
            "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "walls": walls,
            "torch_peak_bytes": torch_peak, "rss_peak_bytes": max(0, maxrss_after - rss_before),
            "rss_floor_bytes": max(0, maxrss_before - rss_before)}


def _subprocess_case(args, impl: str, seq_len: int, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.attention", "--child", f"{impl},{seq_len},{dtype}",
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
           "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += ["--backward"] if args.backward else []
    env = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        reason = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"impl": impl, "seq_len": seq_len, "dtype": dtype, "error": reason[0][:120]}
    return json.loads(lines[-1])


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def print_tables(results: list[dict], dtype: str, seq_lens: list[int], impls: list[str], what: str) -> None:
    by = {(r["seq_len"], r["impl"]): r for r in results if r["dtype"] == dtype and "error" not in r}

    def get(seq_len: int, impl: str, key: str) -> float | None:
        return by.get((seq_len, impl), {}).get(key)

    def table(title: str, keys: tuple[str, str], labels: tuple[str, str], scale: float, ratio: tuple[str, str]) -> None:
        print(f"\n#### {dtype}, {what}: {title}\n")
        heads = [f"{i} {label}" for label in labels for i in impls]
        ratios = [f"{ratio[0]}/{ratio[1]} {label}" for label in labels]
        print("| T | " + " | ".join(heads + ratios) + " |")
        print("|---" * (1 + len(heads) + len(ratios)) + "|")
        for T in seq_lens:
            cells = [_fmt(get(T, i, key), scale) for key in keys for i in impls]
            cells += [_ratio(get(T, ratio[0], key), get(T, ratio[1], key)) for key in keys]
            print(f"| {T} | " + " | ".join(cells) + " |")

    table("time of one call, median (ms)", ("wall_s", "cpu_s"), ("wall", "CPU"), 1e3, ("flash", "sdpa"))
    table("peak memory of one call (MiB)", ("torch_peak_bytes", "rss_peak_bytes"), ("torch", "RSS"), 1 / MiB,
          ("naive", "flash"))
    for r in results:
        if r["dtype"] == dtype and "error" in r:
            print(f"\n{r['impl']} at T={r['seq_len']} failed: {r['error']}")


def _environment(args) -> str:
    import torch
    policy = os.environ.get("OMP_WAIT_POLICY", "unset") if args.omp_wait_policy == "inherit" else args.omp_wait_policy
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"torch {torch.__version__}, {cpu}, {os.cpu_count()} CPUs, threads "
            f"{args.threads or torch.get_num_threads()}, OMP_WAIT_POLICY={policy}, "
            f"load average {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="512,1024,2048,4096,8192", help="comma-separated T values")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: naive, flash, sdpa")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each case (default: torch's)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "inherit"],
                   help="OMP_WAIT_POLICY of each case (default PASSIVE; 'inherit' keeps this environment's)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backward", action="store_true", help="measure forward + backward (training) instead of forward")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "impl,T,dtype": measure one case
    args = p.parse_args(argv)
    if args.child:
        impl, seq_len, dtype = args.child.split(",")
        print(json.dumps(run_case(impl, int(seq_len), dtype, args.heads, args.kv_heads, args.head_dim,
                                  args.repeats, args.threads, args.backward)))
        return
    try:
        seq_lens = [int(t) for t in args.seq_lens.split(",")]
    except ValueError:
        p.error(f"--seq-lens={args.seq_lens!r}: expected comma-separated positive integers, e.g. 512,1024")
    if min(seq_lens) < 1 or args.repeats < 1:
        p.error(f"--seq-lens values and --repeats must be >= 1 (got {args.seq_lens!r}, {args.repeats})")
    dtypes, impls = args.dtypes.split(","), args.impls.split(",")
    for name, allowed in (("dtype", ("float32", "bfloat16")), ("impl", IMPLS)):
        bad = [x for x in (dtypes if name == "dtype" else impls) if x not in allowed]
        if bad:
            p.error(f"unknown {name} {bad[0]!r}; choose from: {', '.join(allowed)}")
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        p.error(f"--kv-heads={args.kv_heads} must divide --heads={args.heads}")
    what = "forward + backward" if args.backward else "forward"
    print(f"Causal prefill ({what}), batch 1, {args.heads} q heads, {args.kv_heads} kv heads, head_dim {args.head_dim}; "
          f"{_environment(args)}.")
    print("torch = peak bytes held by torch tensors during one call (profiler allocation events); "
          "RSS = peak resident set growth during one call, each case in a fresh process.")
    results = []
    for dtype in dtypes:
        for T in seq_lens:
            for impl in impls:
                results.append(_subprocess_case(args, impl, T, dtype))
                print(f"  measured {dtype} T={T} {impl}", file=sys.stderr, flush=True)
        print_tables(results, dtype, seq_lens, impls, what)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
