"""A bounded soak: steady mixed load on a kvserve server, its resident memory sampled over time.

    python -m benchmarks.soak [--duration 600] [--concurrency 8] [--model smollm2-135m] [--slope-minutes 10]
    python -m benchmarks.soak --base-url http://host:8000 --pid 1234      # a server already running

Starts `python -m service.cli serve` (unless --base-url is given), then `--concurrency` clients
send requests back to back for `--duration` seconds: completions and chats, streamed and not,
prompts of mixed lengths with and without a shared prefix, a few with stop strings, seeds,
logprobs or an early disconnect, so every path that allocates is exercised. Every `--interval`
seconds (a minute by default) it prints the server's RSS (VmRSS from /proc), its change, and the
requests and failures so far. At the end: the RSS slope over the last `--slope-minutes` minutes
(a least-squares line through the samples, MB per minute), KV blocks still held once the server
is idle (leaked blocks: must be 0), and, with --json, everything as a JSON file.
Printed, never asserted; BENCHMARKS.md records a 30-minute run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("the river city light engine paper garden music history number simple quickly under between people "
         "language small forest winter café naïve 東京 😀").split()
SYSTEM = "You are a careful assistant who answers questions about rivers, cities and music. " * 4


@dataclass
class Tally:
    requests: int = 0
    failures: int = 0
    disconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, what: str = "") -> None:
        with self.lock:
            self.requests += 1
            if not ok:
                self.failures += 1
                self.errors[what] = self.errors.get(what, 0) + 1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB) samples."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(m for _, m in samples) / n
    den = sum((t - mx) ** 2 for t, _ in samples)
    return sum((t - mx) * (m - my) for t, m in samples) / den if den else float("nan")


def one_request(http: httpx.Client, rng: random.Random, max_tokens: int, max_prompt_bytes: int, tally: Tally) -> None:
    """One request of a random kind; counts it as a success or a failure."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.choice((4, 16, 60, 200))))
    if rng.random() < 0.4:
        text = SYSTEM + text
    # a byte-level BPE never has more tokens than bytes: this always fits the context
    text = text.encode()[:max_prompt_bytes].decode(errors="ignore")
    stream = rng.random() < 0.5
    chat = rng.random() < 0.5
    body: dict = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice((0, 0.7, 1.0)), "stream": stream}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
    else:
        path, body["prompt"] = "/v1/completions", text
    roll = rng.random()
    if roll < 0.1:
        body["stop"] = ["the", "\n"]
    elif roll < 0.2:
        body["seed"] = rng.randrange(2**32)
    elif roll < 0.25 and not chat:
        body["logprobs"] = 5
    try:
        if not stream:
            r = http.post(path, json=body)
            tally.add(r.status_code == 200, f"status {r.status_code}")
            return
        leave_early = rng.random() < 0.1
        with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                tally.add(False, f"status {r.status_code}")
                return
            for i, _ in enumerate(r.iter_lines()):
                if leave_early and i >= 2:  # the client goes away mid-stream: the server must abort it
                    with tally.lock:
                        tally.disconnects += 1
                    break
        tally.add(True)
    except httpx.HTTPError as exc:
        tally.add(False, type(exc).__name__)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--port", "0",
           "--kv-cache-memory", args.kv_cache_memory, "--log-level", "info", *args.server_arg]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on (http://[\d.]+:\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, match.group(1)
        if "error" in line.lower():
            print(line, end="", file=sys.stderr)
    raise RuntimeError(f"server exited with {proc.wait()} before it listened")


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--interval", type=float, default=60, help="seconds between RSS lines (default 60)")
    p.add_argument("--slope-minutes", type=float, default=10, help="the slope is fitted over the last N minutes")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--server-arg", action="append", default=[], help="passed to `kvserve serve` (repeatable)")
    p.add_argument("--base-url", default=None, help="soak a server already running (then give --pid)")
    p.add_argument("--pid", type=int, default=None, help="the process whose RSS to sample, with --base-url")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the samples and totals here")
    args = p.parse_args(argv)

    proc = None
    if args.base_url is None:
        proc, base_url = start_server(args)
        pid = proc.pid
    else:
        if args.pid is None:
            p.error("--base-url needs --pid (the server process to sample)")
        base_url, pid = args.base_url.rstrip("/"), args.pid
    print(f"soak: {base_url} pid {pid}, {args.concurrency} clients, {args.duration:g}s, model {args.model}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', '-')}", flush=True)
    tally = Tally()
    stop = threading.Event()

    max_model_len = httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    max_prompt_bytes = max_model_len - args.max_tokens - 64  # room for the chat template too

    def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        with httpx.Client(base_url=base_url, timeout=600) as http:
            while not stop.is_set():
                one_request(http, rng, args.max_tokens, max_prompt_bytes, tally)

    started = time.monotonic()
    samples: list[tuple[float, float]] = [(0.0, rss_mb(pid))]
    print(f"{'minute':>7} {'RSS MB':>9} {'change':>8} {'requests':>9} {'failures':>9}", flush=True)
    print(f"{0:7.1f} {samples[0][1]:9.1f} {'':>8} {0:9d} {0:9d}", flush=True)
    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
    for w in workers:
        w.start()
    try:
        while (elapsed := time.monotonic() - started) < args.duration:
            time.sleep(min(args.interval, args.duration - elapsed))
            minute = (time.monotonic() - started) / 60
            rss = rss_mb(pid)
            print(f"{minute:7.1f} {rss:9.1f} {rss - samples[-1][1]:+8.1f} {tally.requests:9d} {tally.failures:9d}",
                  flush=True)
            samples.append((minute, rss))
    finally:
        stop.set()
        for w in workers:
            w.join(600)
    # once idle, every block must be back (aborted streams included)
    deadline = time.monotonic() + 60
    while metric(base_url, "kvserve_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.5)
    leaked = metric(base_url, "kvserve_kv_cache_blocks", state="used")
    end_minute = samples[-1][0]
    recent = [(t, m) for t, m in samples if t >= end_minute - args.slope_minutes]
    slope = slope_mb_per_min(recent)
    print(f"requests {tally.requests} (failures {tally.failures}, client disconnects {tally.disconnects}); "
          f"errors {tally.errors or 'none'}")
    print(f"RSS {samples[0][1]:.1f} -> {samples[-1][1]:.1f} MB; slope over the last {args.slope_minutes:g} min: "
          f"{slope:+.2f} MB/min; leaked KV blocks once idle: {leaked:g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "requests": tally.requests, "failures": tally.failures,
                       "disconnects": tally.disconnects, "errors": tally.errors, "slope_mb_per_min": slope,
                       "slope_minutes": args.slope_minutes, "leaked_blocks": leaked, "args": vars(args)}, f, indent=1)
    if proc is not None:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
