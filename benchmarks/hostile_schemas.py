"""Hostile schemas against a live server: memory, compile budget and fairness through a burst (issue 21).

    python -m benchmarks.hostile_schemas [--model smollm2-135m] [--attempts 20] [--concurrency 4]

Starts `python -m service.cli serve` with its defaults (compile budget 5 s, 512 MiB, 4 workers),
sends one small structured request (xgrammar's import, the grammar zygote's start) and records the
memory of the server process and of its grammar processes (the zygote and its compile children):
resident (VmRSS) and proportional (Pss, shared pages split between the processes that map them).
Then bursts of `--attempts` requests each, `--concurrency` at a time, each kind `--rounds` times:

1. the issue's 20,000-property schema (~600 KB), each refused by the cheap checks;
2. schemas that pass every check but compile for minutes (eight 66-byte patterns, each one
   distinct), each killed at the compile budget;

while a small-schema request goes every second (its latency: fairness). After 10 s of idle it
records memory again. Printed, never asserted; BENCHMARKS.md records a run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

SMALL = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}, "required": ["answer"]}


def big_schema() -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)},
            "required": [f"p{i}" for i in range(20_000)], "additionalProperties": False}


def slow_schema(tag: int) -> dict:
    return {"type": "object", "properties": {k: {"type": "string", "pattern": f"^([a-z]{{1,20}}[0-9]{{1,20}}){{1,1000}}{k}{tag}$"}
                                             for k in "abcdefgh"}}


def _status(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) << 10 for line in f if line.startswith("Pss:"))
    except OSError:
        return 0


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        kids = [p for p, pp in parents.items() if pp == todo[-1]]
        todo.pop()
        out += kids
        todo += kids
    return out


class Memory:
    """Samples every 0.2 s: the server's RSS and PSS, its grammar processes' PSS and count; keeps peaks."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = {"server_rss": 0, "server_pss": 0, "grammar_pss": 0, "grammar_processes": 0}
        self._stop = threading.Event()

    def now(self) -> dict:
        family = _descendants(self.pid)
        return {"server_rss": _status(self.pid, "VmRSS"), "server_pss": _pss(self.pid),
                "grammar_pss": sum(_pss(p) for p in family), "grammar_processes": len(family)}

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for key, value in self.now().items():
                self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> Memory:
        self.peak = dict.fromkeys(self.peak, 0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._stop.clear()


def show(label: str, m: dict) -> str:
    return (f"{label:<34} server RSS {m['server_rss'] / 2**20:7.0f} MiB  PSS {m['server_pss'] / 2**20:7.0f} MiB | "
            f"grammar processes {m['grammar_processes']}, PSS {m['grammar_pss'] / 2**20:6.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--attempts", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="both bursts, this many times (is the memory steady?)")
    ap.add_argument("--serve-args", default="", help="more `kvserve serve` options, e.g. '--grammar-compile-timeout 2'")
    args = ap.parse_args()

    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--port", "0",
                             "--kv-cache-memory", "256MiB", "--log-level", "info", *args.serve_args.split()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"kvserve listening on (http://[\d.]+:\d+)", line)
        if match:
            base = match.group(1)
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]  # drained
    http = httpx.Client(base_url=base, timeout=600)

    def ask(schema: dict) -> tuple[int, float, str]:
        started = time.monotonic()
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Answer in JSON."}],
                                                     "max_tokens": 24, "temperature": 0,
                                                     "response_format": {"type": "json_schema", "json_schema": {
                                                         "name": "a", "schema": schema}}})
        message = r.json()["error"]["message"] if r.status_code >= 400 else ""
        return r.status_code, time.monotonic() - started, message

    try:
        print(f"{args.model}: {ask(SMALL)[:2]} (first structured request: imports, zygote start)")
        quiet = [ask(SMALL)[1] for _ in range(5)]
        print(f"small schema alone: median {statistics.median(quiet):.2f} s, max {max(quiet):.2f} s (5 requests)")
        memory = Memory(proc.pid)
        time.sleep(2)
        baseline = memory.now()
        print(show("baseline (after one small schema)", baseline))
        bursts = [(f"20,000-property schema, round {r + 1}", [big_schema()] * args.attempts) for r in range(args.rounds)]
        bursts += [(f"schemas over the compile budget, round {r + 1}",
                    [slow_schema(r * args.attempts + i) for i in range(args.attempts)]) for r in range(args.rounds)]
        for name, schemas in bursts:
            small: list[float] = []
            done = threading.Event()

            def probe_small(done: threading.Event = done, small: list[float] = small) -> None:
                while not done.wait(1.0):
                    status, seconds, _ = ask(SMALL)
                    small.append(seconds if status == 200 else float("nan"))

            prober = threading.Thread(target=probe_small, daemon=True)
            started = time.monotonic()
            with memory, ThreadPoolExecutor(args.concurrency) as pool:
                prober.start()
                results = list(pool.map(ask, schemas))
                done.set()
                prober.join()
            took = time.monotonic() - started
            statuses = sorted({r[0] for r in results})
            print(f"\n{args.attempts} x {name}: {took:.1f} s, statuses {statuses}, each "
                  f"{statistics.median(r[1] for r in results):.2f} s (median); e.g. {results[0][2][:110]!r}")
            if small:
                print(f"  small schema meanwhile: {len(small)} requests, median {statistics.median(small):.2f} s, "
                      f"max {max(small):.2f} s")
            print(show("  peak during", memory.peak))
            time.sleep(10)
            print(show("  10 s after", memory.now()))
        print(f"\nthe server's RSS after {2 * args.rounds * args.attempts} hostile requests: "
              f"{(memory.now()['server_rss'] - baseline['server_rss']) / 2**20:+.0f} MiB")
        print(json.dumps({"baseline": baseline, "after": memory.now()}))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
