"""`kvserve bench serve`: load-test any OpenAI-compatible server and report client-side latency.

Two ways to offer load:
- closed loop: `--max-concurrency N` requests in flight at any time (the next starts when one ends);
- open loop: `--request-rate R` requests per second arriving as a Poisson process (gamma-distributed
  gaps with `--burstiness` as the shape: 1 is Poisson, < 1 burstier, > 1 more regular); with
  `--max-concurrency` too, arrivals wait for a free slot.
Warm-up requests go first and are not counted. A tqdm bar shows progress; the summary table goes to
stdout and `--result-json` keeps every figure plus each request's timings.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import httpx
from tqdm import tqdm

from service.bench import datasets
from service.bench.client import ENDPOINTS, RequestRecord, Target, send_request
from service.bench.datasets import SampleRequest
from service.bench.stats import Summary, format_summary, parse_goodput, parse_percentiles, summarize

DATASETS = ("random", "natural", "shared-prefix", "jsonl")


class BenchmarkError(RuntimeError):
    """A run that cannot go on (server unreachable, every warm-up failed): one line for the user."""


def arrival_offsets(n: int, request_rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start: 0 first, then gamma gaps of mean 1 / request_rate.

    Gamma(shape=burstiness, scale=1 / (rate * burstiness)) keeps the mean gap at 1 / rate; shape 1 is
    the exponential gap of a Poisson process. An infinite rate sends everything at once.
    """
    if not request_rate > 0.0:
        raise ValueError(f"--request-rate={request_rate} is out of range: must be > 0 (inf for all at once)")
    if not 0.0 < burstiness < math.inf:
        raise ValueError(f"--burstiness={burstiness} is out of range: must be > 0")
    if math.isinf(request_rate):
        return [0.0] * n
    scale = 1.0 / (request_rate * burstiness)
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        offsets.append(t)
    return offsets


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """How load is offered; `max_concurrency` None means unbounded."""
    max_concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    seed: int = 0
    num_warmups: int = 0
    progress: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency={self.max_concurrency} is out of range: must be >= 1")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups={self.num_warmups} is out of range: must be >= 0")
        if not self.timeout_s > 0.0:
            raise ValueError(f"--timeout={self.timeout_s} is out of range: must be > 0 seconds")
        arrival_offsets(0, self.request_rate, self.burstiness, random.Random(0))  # validates both


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    start: float            # perf_counter of the first send, the zero of per-request send times


def _client(load: LoadConfig, n: int, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    conns = load.max_concurrency or max(n, 1)
    return httpx.AsyncClient(timeout=httpx.Timeout(load.timeout_s, connect=min(load.timeout_s, 30.0), pool=None),
                             limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
                             transport=transport)


async def _gather_limited(http, target: Target, requests: list[SampleRequest], limit: int | None,
                          offsets: list[float], on_done) -> tuple[list[RequestRecord], float]:
    sem = asyncio.Semaphore(limit) if limit else None
    t0 = time.perf_counter()

    async def one(i: int, req: SampleRequest) -> RequestRecord:
        delay = t0 + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is None:
            rec = await send_request(http, target, req, i)
        else:
            async with sem:
                rec = await send_request(http, target, req, i)
        on_done()
        return rec

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))), t0


async def run_load(target: Target, requests: list[SampleRequest], load: LoadConfig,
                   transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Warm up, then send every request as `load` says; the records come back in request order.

    `transport` replaces the network (tests pass an `httpx.MockTransport`).
    """
    if not requests:
        raise ValueError("no requests to send")
    async with _client(load, len(requests), transport) as http:
        if load.num_warmups:
            warm = [requests[i % len(requests)] for i in range(load.num_warmups)]
            recs, _ = await _gather_limited(http, target, warm, load.max_concurrency, [0.0] * len(warm), lambda: None)
            if not any(r.success for r in recs):
                r = recs[0]
                raise BenchmarkError(f"every warm-up request failed; first: status {r.status}: {r.error}")
        offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, random.Random(load.seed))
        with tqdm(total=len(requests), disable=not load.progress, unit="req", file=sys.stderr) as bar:
            records, t0 = await _gather_limited(http, target, requests, load.max_concurrency, offsets,
                                                lambda: bar.update(1))
        duration = max(r.end for r in records) - t0
    return RunResult(records, duration, t0)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def list_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model ids `/v1/models` lists, in its order."""
    try:
        resp = httpx.get(base_url + "/v1/models", headers=_headers(api_key), timeout=timeout)
        resp.raise_for_status()
        ids = [m["id"] for m in resp.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise BenchmarkError(f"cannot list models at {base_url}/v1/models ({type(exc).__name__}: {exc}); "
                             "is the server up? or pass --model") from None
    if not ids:
        raise BenchmarkError(f"{base_url}/v1/models lists no models; pass --model")
    return ids


def measure_tokens_per_word(base_url: str, model: str, api_key: str | None = None) -> float | None:
    """Tokens per random word as the server's `/tokenize` counts them; None when it has no such route."""
    text, n_words = datasets.random_text(200, random.Random(1234))
    try:
        resp = httpx.post(base_url + "/tokenize", json={"model": model, "prompt": text.lstrip()},
                          headers=_headers(api_key), timeout=30.0)
        if resp.status_code != 200:
            return None
        body = resp.json()
        count = body.get("count") if isinstance(body.get("count"), int) else len(body["tokens"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return count / n_words if count > 0 else None


def build_requests(args: argparse.Namespace, tokens_per_word: float) -> list[SampleRequest]:
    output_len = args.random_output_len if args.output_len is None else args.output_len
    if args.dataset == "random":
        return datasets.random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                        args.random_range_ratio, seed=args.seed, tokens_per_word=tokens_per_word)
    if args.dataset == "natural":
        return datasets.natural_requests(args.num_prompts, output_len, seed=args.seed, tokens_per_word=tokens_per_word)
    if args.dataset == "shared-prefix":
        return datasets.shared_prefix_requests(args.num_prompts, args.shared_prefix_len, args.shared_suffix_len,
                                               output_len, seed=args.seed, tokens_per_word=tokens_per_word)
    if not args.dataset_path:
        raise ValueError("--dataset jsonl needs --dataset-path FILE")
    return datasets.jsonl_requests(args.dataset_path, args.num_prompts, output_len, tokens_per_word=tokens_per_word)


def base_url_of(args: argparse.Namespace) -> str:
    if args.base_url:
        if not args.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url {args.base_url!r} must start with http:// or https://")
        return args.base_url.rstrip("/")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} is out of range: must be in [1, 65535]")
    return f"http://{args.host}:{args.port}"


def result_document(args: argparse.Namespace, target: Target, summary: Summary, run: RunResult,
                    tokens_per_word: float) -> dict:
    """Everything the run measured: its settings, the summary, and each request's timings."""
    requests = [{
        "index": r.index, "success": r.success, "status": r.status, "error": r.error,
        "prompt_tokens": r.prompt_len, "output_tokens": r.output_tokens, "max_tokens": r.max_tokens,
        "usage_reported": r.usage_reported, "send_time_s": r.start - run.start, "ttft_s": r.ttft,
        "tpot_s": r.tpot, "e2el_s": r.e2e, "itl_s": r.itl,
    } for r in run.records]
    settings = {k: v for k, v in vars(args).items() if k not in ("api_key", "func", "command")}
    settings["request_rate"] = str(args.request_rate)  # "inf" stays valid JSON
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "base_url": target.base_url,
            "endpoint": target.endpoint, "model": target.model, "tokens_per_word": tokens_per_word,
            "settings": settings, "summary": asdict(summary), "requests": requests}


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    g.add_argument("--model", help="model id to request (default: the first of /v1/models)")
    g.add_argument("--api-key", help="sent as a Bearer token")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--max-concurrency", type=int, help="closed loop: at most N requests in flight")
    g.add_argument("--request-rate", type=float, default=math.inf, help="open loop: mean requests/s (default inf)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    g.add_argument("--num-warmups", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM/kvserve extension)")
    g.add_argument("--temperature", type=float, default=0.0)
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="random", choices=DATASETS)
    g.add_argument("--dataset-path", help="JSONL file of {\"prompt\": ..., \"max_tokens\"?: ...} rows")
    g.add_argument("--random-input-len", type=int, default=128)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths spread over [L(1-r), L(1+r)]")
    g.add_argument("--output-len", type=int, help="max_tokens for natural/shared-prefix/jsonl (default: --random-output-len)")
    g.add_argument("--shared-prefix-len", type=int, default=1024, help="approx tokens of the shared system prompt")
    g.add_argument("--shared-suffix-len", type=int, default=32, help="approx tokens of each request's own part")
    g.add_argument("--tokens-per-word", type=float, help="token estimate per word (default: ask /tokenize, else 1)")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument("--percentiles", default="50,90,99")
    g.add_argument("--result-json", help="write every figure and per-request timings here")
    g.add_argument("--disable-tqdm", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, resolve the model, build the prompts, run, print and save. ValueError: bad option."""
    base_url = base_url_of(args)
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} is out of range: must be >= 0")
    if args.tokens_per_word is not None and not args.tokens_per_word > 0:
        raise ValueError(f"--tokens-per-word={args.tokens_per_word} is out of range: must be > 0")
    slo = parse_goodput(args.goodput) if args.goodput else None
    percentiles = parse_percentiles(args.percentiles)
    load = LoadConfig(args.max_concurrency, args.request_rate, args.burstiness, args.seed, args.num_warmups,
                      not args.disable_tqdm, args.timeout)
    requests = build_requests(args, 1.0)  # bad dataset options fail before touching the server
    model = args.model or list_models(base_url, args.api_key)[0]
    tokens_per_word = args.tokens_per_word or measure_tokens_per_word(base_url, model, args.api_key) or 1.0
    if tokens_per_word != 1.0:
        requests = build_requests(args, tokens_per_word)
    target = Target(base_url, args.endpoint, model, args.api_key, args.ignore_eos, args.temperature)
    print(f"kvserve bench: {len(requests)} requests to {base_url}{args.endpoint} model={model} "
          f"concurrency={args.max_concurrency or 'unbounded'} rate={args.request_rate} "
          f"(~{tokens_per_word:.2f} tokens/word)", file=sys.stderr)
    run = asyncio.run(run_load(target, requests, load))
    summary = summarize(run.records, run.duration_s, slo=slo, percentiles=percentiles)
    print(format_summary(summary))
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as f:
            json.dump(result_document(args, target, summary, run, tokens_per_word), f, indent=2)
    return 0
