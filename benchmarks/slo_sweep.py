"""Latency against load for one `kvserve serve` replica, and the alert / autoscaling thresholds it
implies (deploy/prometheus/alerts.yml, deploy/k8s/hpa.yaml, keda-scaledobject.yaml).

Starts `python -m service.cli serve` (SmolLM2 by default, its defaults otherwise), then for each
`--concurrency` level runs `kvserve bench serve` (closed loop, 128-token prompts, 128 streamed
tokens, ignore_eos) and reads the server's own histograms before and after, so every figure is
reported twice: as the client saw it and as Prometheus would compute it (histogram_quantile over
the level's increase). Prints a markdown table, then the thresholds by these formulas:

- reference load C_ref = the highest level measured (32: half of --max-num-seqs 64, the load
  BENCHMARKS.md documents);
- TTFT alert: server p99 TTFT at C_ref x 1.5 (headroom so the documented load does not fire it),
  rounded up to a bucket edge of kvserve_time_to_first_token_seconds;
- ITL alert: server p50 ITL at C_ref x 1.5, rounded up to a bucket edge (p50: the pace a user feels;
  p99 ITL is dominated by the steps that carry another request's prefill chunk);
- autoscaling target: C_ref / 2 requests in flight (running + waiting) per replica: a replica
  scales out while it still has half its measured headroom, because a new pod needs minutes to load.
Run on a quiet machine; nothing here is asserted by a test.

    python -m benchmarks.slo_sweep --concurrency 1,8,16,32 --out bench_results/slo
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # service/metrics.py _LATENCY_BUCKETS
HEADROOM = 1.5


def scrape(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def buckets(m: dict[tuple, float], name: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of a histogram summed over its series, sorted by le."""
    out: dict[float, float] = {}
    for (n, labels), value in m.items():
        if n == name + "_bucket":
            le = float(dict(labels)["le"])
            out[le] = out.get(le, 0.0) + value
    return sorted(out.items())


def histogram_quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over the increase between two scrapes (linear within a bucket)."""
    inc = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    total = inc[-1][1] if inc else 0
    if total <= 0:
        return None
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in inc:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return None


def bucket_edge_at_or_above(x: float) -> float:
    return next(b for b in LATENCY_BUCKETS if b >= x)


class Sampler(threading.Thread):
    """Samples kvserve_num_requests_running + waiting every 0.5 s while a level runs."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.values, self.stop = url, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            m = scrape(self.url)
            self.values.append(sum(v for (n, _), v in m.items()
                                   if n in ("kvserve_num_requests_running", "kvserve_num_requests_waiting")))


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--port", "0",
           "--log-level", "info", "--log-stats-interval", "0", *args.server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        match = re.search(r"kvserve listening on (http://[\d.]+:\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
            return proc, match.group(1)
    raise RuntimeError(f"server exited with {proc.wait()}")


def run_level(url: str, c: int, args, out: Path) -> dict:
    port = url.rsplit(":", 1)[1]
    result = out / f"c{c}.json"
    before = scrape(url)
    sampler = Sampler(url)
    sampler.start()
    subprocess.run([sys.executable, "-m", "service.cli", "bench", "serve", "--port", port,
                    "--max-concurrency", str(c), "--num-prompts", str(max(args.min_prompts, args.waves * c)),
                    "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                    "--ignore-eos", "--num-warmups", "1", "--disable-tqdm", "--result-json", str(result)],
                   check=True, stdout=subprocess.DEVNULL)
    sampler.stop.set()
    sampler.join()
    after = scrape(url)
    s = json.loads(result.read_text())["summary"]

    def q(name, quantile):
        return histogram_quantile(quantile, buckets(before, name), buckets(after, name))

    return {"c": c, "requests": s["completed"], "failed": s["failed"], "out_tok_s": s["output_throughput"],
            "ttft_p50": s["ttft_ms"]["percentiles"]["p50"] / 1e3, "ttft_p99": s["ttft_ms"]["percentiles"]["p99"] / 1e3,
            "tpot_p50": s["tpot_ms"]["percentiles"]["p50"] / 1e3, "itl_p99": s["itl_ms"]["percentiles"]["p99"] / 1e3,
            "srv_ttft_p99": q("kvserve_time_to_first_token_seconds", 0.99),
            "srv_itl_p50": q("kvserve_inter_token_latency_seconds", 0.5),
            "srv_itl_p99": q("kvserve_inter_token_latency_seconds", 0.99),
            "in_flight_mean": sum(sampler.values) / max(len(sampler.values), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency")
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("bench_results/slo"))
    p.add_argument("server_args", nargs="*", help="more `kvserve serve` options, after --")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc, url = start_server(args)
    try:
        rows = [run_level(url, c, args, args.out) for c in levels]
    finally:
        proc.terminate()
        proc.wait(60)

    def f(x, scale=1.0, digits=2):
        return "-" if x is None else f"{x * scale:.{digits}f}"

    print("| concurrency | requests (failed) | out tok/s | TTFT p50 / p99 (s) | TPOT p50 (s) | ITL p99 (s) "
          "| server TTFT p99 (s) | server ITL p50 / p99 (s) | in flight (mean) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['c']} | {r['requests']} ({r['failed']}) | {r['out_tok_s']:.1f} | {f(r['ttft_p50'])} / "
              f"{f(r['ttft_p99'])} | {f(r['tpot_p50'], 1, 3)} | {f(r['itl_p99'])} | {f(r['srv_ttft_p99'])} | "
              f"{f(r['srv_itl_p50'], 1, 3)} / {f(r['srv_itl_p99'])} | {r['in_flight_mean']:.1f} |")
    ref = rows[-1]
    ttft = bucket_edge_at_or_above(HEADROOM * (ref["srv_ttft_p99"] or 0))
    itl = bucket_edge_at_or_above(HEADROOM * (ref["srv_itl_p50"] or 0))
    print(f"\nreference load C_ref = {ref['c']}: server TTFT p99 {f(ref['srv_ttft_p99'])} s, ITL p50 "
          f"{f(ref['srv_itl_p50'], 1, 3)} s")
    print(f"TTFT alert: p99 > {ttft:g} s  (= {HEADROOM} x {f(ref['srv_ttft_p99'])} s, up to a bucket edge)")
    print(f"ITL alert:  p50 > {itl:g} s  (= {HEADROOM} x {f(ref['srv_itl_p50'], 1, 3)} s, up to a bucket edge)")
    print(f"autoscaling target: {ref['c'] // 2} requests in flight per replica (C_ref / 2)")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
