"""Load-test statistics: pure functions over the per-request records of one run.

Definitions follow `vllm bench serve`, measured at the client:
- TTFT: request sent -> first streamed chunk with text.
- ITL: gap between consecutive text chunks (all requests pooled).
- TPOT: (e2e - TTFT) / (output tokens - 1) per request; undefined with one output token.
- e2e latency: request sent -> response finished.
- goodput: successful requests per second that meet every SLO given (TTFT, TPOT, e2e in ms);
  a request with one output token has no TPOT and meets a TPOT SLO trivially.
Latency and token figures count successful requests only; failures are tallied by HTTP status.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.bench.client import RequestRecord

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_METRICS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is out of range: must be in [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency metric, in milliseconds. `std` is the population standard deviation."""
    count: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    percentiles: dict[str, float]   # "p50", "p90", "p99", ...


def distribution(seconds: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Distribution | None:
    """Mean, median, std, extremes and percentiles of `seconds`, reported in ms; None when empty."""
    if not seconds:
        return None
    ms = [s * 1000.0 for s in seconds]
    mean = math.fsum(ms) / len(ms)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in ms) / len(ms))
    return Distribution(len(ms), mean, percentile(ms, 50.0), std, min(ms), max(ms),
                        {percentile_key(q): percentile(ms, q) for q in percentiles})


def percentile_key(q: float) -> str:
    return f"p{q:g}"


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'50,90,99' -> (50.0, 90.0, 99.0); each in (0, 100]."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--percentiles {text!r} is not a comma list of numbers such as 50,90,99") from None
    for q in values:
        if not 0.0 < q <= 100.0:
            raise ValueError(f"--percentiles value {q:g} is out of range: must be in (0, 100]")
    return values


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objectives in milliseconds; None = not constrained."""
    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None

    def met_by(self, rec: RequestRecord) -> bool:
        tpot = rec.tpot
        return (rec.success
                and (self.ttft is None or rec.ttft * 1000.0 <= self.ttft)
                and (self.tpot is None or tpot is None or tpot * 1000.0 <= self.tpot)
                and (self.e2el is None or rec.e2e * 1000.0 <= self.e2el))


def parse_goodput(items: Sequence[str]) -> SLO:
    """['ttft:500', 'tpot:50', 'e2el:2000'] -> SLO; one-line errors for anything else."""
    limits: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: use METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not ms > 0.0 or math.isinf(ms):
            raise ValueError(f"--goodput {item!r}: the limit must be a number of milliseconds > 0")
        limits[name] = ms
    return SLO(**limits)


@dataclass(frozen=True, slots=True)
class Summary:
    num_requests: int
    completed: int
    failed: int
    failures: dict[str, int]           # "503": 4, "connection error": 1, ...
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float          # completed requests / s
    output_throughput: float           # output tokens / s
    total_token_throughput: float      # (input + output) tokens / s
    mean_concurrency: float            # sum of e2e latencies / duration
    goodput: float | None              # requests / s meeting every SLO; None without SLOs
    slo: dict[str, float] = field(default_factory=dict)
    ttft_ms: Distribution | None = None
    tpot_ms: Distribution | None = None
    itl_ms: Distribution | None = None
    e2el_ms: Distribution | None = None


def failure_key(rec: RequestRecord) -> str:
    if rec.status == 0:
        return "connection error"
    if rec.status == 200:
        return "200 (error in stream)"
    return str(rec.status)


def summarize(records: Sequence[RequestRecord], duration_s: float, *, slo: SLO | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Summary:
    """Every figure of a run from its records and its wall-clock duration."""
    if duration_s <= 0.0:
        raise ValueError(f"duration {duration_s} must be > 0")
    ok = [r for r in records if r.success]
    failures = Counter(failure_key(r) for r in records if not r.success)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    slo_dict = {} if slo is None else {k: v for k, v in zip(SLO_METRICS, (slo.ttft, slo.tpot, slo.e2el)) if v}
    goodput = None if slo is None or not slo_dict else sum(slo.met_by(r) for r in ok) / duration_s
    return Summary(
        num_requests=len(records), completed=len(ok), failed=len(records) - len(ok),
        failures=dict(sorted(failures.items())), duration_s=duration_s,
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s, output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        mean_concurrency=math.fsum(r.e2e for r in records) / duration_s,
        goodput=goodput, slo=slo_dict,
        ttft_ms=distribution([r.ttft for r in ok], percentiles),
        tpot_ms=distribution([t for r in ok if (t := r.tpot) is not None], percentiles),
        itl_ms=distribution([g for r in ok for g in r.itl], percentiles),
        e2el_ms=distribution([r.e2e for r in ok], percentiles),
    )


def format_summary(s: Summary, title: str = "Serving Benchmark Result") -> str:
    """The summary as a fixed-width table for a terminal."""
    lines = [f" {title} ".center(56, "="), ]

    def row(label: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:>16}")

    row("Successful requests:", s.completed)
    row("Failed requests:", s.failed)
    for key, n in s.failures.items():
        row(f"  status {key}:", n)
    row("Benchmark duration (s):", s.duration_s)
    row("Total input tokens:", s.total_input_tokens)
    row("Total generated tokens:", s.total_output_tokens)
    row("Request throughput (req/s):", s.request_throughput)
    if s.goodput is not None:
        row("Request goodput (req/s):", s.goodput)
        lines.append("  SLO: " + ", ".join(f"{k} <= {v:g} ms" for k, v in s.slo.items()))
    row("Output token throughput (tok/s):", s.output_throughput)
    row("Total token throughput (tok/s):", s.total_token_throughput)
    row("Mean concurrency:", s.mean_concurrency)
    for name, label, dist in (("TTFT", "Time to First Token", s.ttft_ms),
                              ("TPOT", "Time per Output Token (excl. 1st token)", s.tpot_ms),
                              ("ITL", "Inter-token Latency", s.itl_ms),
                              ("E2EL", "End-to-end Latency", s.e2el_ms)):
        lines.append(f" {label} ".center(56, "-"))
        if dist is None:
            lines.append(f"{'(no data)':<40}")
            continue
        row(f"Mean {name} (ms):", dist.mean)
        row(f"Median {name} (ms):", dist.median)
        row(f"Std {name} (ms):", dist.std)
        for key, value in dist.percentiles.items():
            row(f"{key.upper()} {name} (ms):", value)
    lines.append("=" * 56)
    return "\n".join(lines)
