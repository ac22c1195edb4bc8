"""`kvserve bench variants`: what each attention variant of one checkpoint costs and gives.

Per variant: KV bytes per token, capacity in tokens at a byte budget, how many concurrent
`--seq-len`-token sequences fit (all from `KVLayout`, the arithmetic the server itself uses);
perplexity on a fixed slice of the Python documentation text in `pydoc_data.topics` (on every
Python install), float32, no-cache forward over sliding windows; and, through a real server started
with every variant at once, output throughput at each `--concurrency` level and TTFT p50 under the
highest. Writes a markdown table (stdout and DIR/variants.md) and a plot (DIR/variants.png).

Variants with fewer K/V heads than the checkpoint are made by mean-pooling K/V heads without
uptraining (GQA paper, section 3.1), so they lose quality; the report says by how much. A
`NAME=DIR` variant is a converted checkpoint (`kvserve convert`) served with the checkpoint's other
tensors: its row carries the training budget recorded in DIR/kvserve_convert.json beside the
mean-pooled perplexity at the same K/V head count, and the plot marks it apart.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.bench.client import Target
from service.bench.datasets import random_requests
from service.bench.serve import BenchmarkError, LoadConfig, list_models, measure_tokens_per_word, run_load
from service.bench.stats import summarize

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(slots=True)
class VariantRow:
    variant: str
    n_kv_heads: int
    bytes_per_token: int
    capacity_tokens: int
    concurrent_seqs: int
    perplexity: float = math.nan
    ppl_ratio: float = math.nan                     # perplexity / native perplexity
    throughput: dict[int, float] = field(default_factory=dict)   # concurrency -> output tok/s
    ttft_p50_ms: dict[int, float] = field(default_factory=dict)  # concurrency -> TTFT p50
    path: str | None = None                         # a converted checkpoint directory (NAME=DIR)
    record: dict = field(default_factory=dict)      # its kvserve_convert.json, when it has one


def footprint(cfg, variant: str, dtype_bytes: int, budget: int, block_size: int, seq_len: int) -> VariantRow:
    """The KV arithmetic of `variant` (a variant name or NAME=DIR) of a checkpoint with config `cfg`."""
    from kvcache.kv_cache import KVLayout
    from model.hf_loader import open_hf
    from model.variants import parse_variant, split_variant

    name, path = split_variant(variant)
    record: dict = {}
    if path is None:
        n_kv = parse_variant(name, cfg.n_heads, cfg.n_kv_heads)
    else:
        n_kv = open_hf(path).config.n_kv_heads
        record_file = Path(path) / "kvserve_convert.json"
        record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    layout = KVLayout(cfg.n_layers, n_kv, cfg.head_dim, dtype_bytes, block_size)
    usable_blocks = layout.num_blocks(budget)
    blocks_per_seq = -(-seq_len // block_size)
    return VariantRow(name, n_kv, layout.bytes_per_token, layout.capacity_tokens(budget),
                      usable_blocks // blocks_per_seq, path=path, record=record)


def held_text() -> str:
    """The held-out text: every pydoc topic, in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def text_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of `held_text()` (encoding only as much text as needed)."""
    text = held_text()
    chars = 8 * n_tokens
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) > n_tokens or chars >= len(text):
            return ids[:n_tokens]
        chars *= 2


def perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """exp(mean NLL) of ids[1:], each token scored once with up to `window` tokens of context.

    Windows start every `stride` tokens; a window scores only the targets no earlier window scored,
    so every target after the first window sees at least `window - stride` tokens of context.
    """
    import torch

    if not 1 <= stride < window:
        raise ValueError(f"stride={stride} must be in [1, window={window})")
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    total, count, scored_to, begin = 0.0, 0, 1, 0
    with torch.no_grad():
        while True:
            end = min(begin + window, len(ids))
            x = torch.tensor(ids[begin:end], device=model.device)
            logp = torch.log_softmax(model(x[None])[0, :-1].float(), dim=-1)  # (T-1, V)
            nll = -logp.gather(1, x[1:, None])[:, 0]   # nll[j] scores ids[begin + 1 + j]
            new = nll[scored_to - begin - 1:]
            total += float(new.double().sum())
            count += new.numel()
            scored_to = end
            if end == len(ids):
                return math.exp(total / count)
            begin += stride


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m service.cli serve ...` as a subprocess; waits for /health, SIGTERMs on exit."""

    def __init__(self, argv: list[str], port: int, log_path: Path, startup_timeout: float):
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *argv, "--port", str(port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise BenchmarkError(f"server exited with status {self.proc.returncode}: {tail[0]} (log: {log_path})")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise BenchmarkError(f"server not healthy after {startup_timeout:g}s (log: {log_path})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def pick_model_id(ids: list[str], variant: str) -> str:
    for model_id in ids:
        if model_id.endswith(f":{variant}"):
            return model_id
    raise BenchmarkError(f"the server lists no model for variant {variant!r}; it lists: {', '.join(ids)}")


def measure_serving(base_url: str, rows: list[VariantRow], args: argparse.Namespace) -> None:
    """Output tok/s at each concurrency and TTFT p50, per variant, filled into `rows`."""
    ids = list_models(base_url)
    for row in rows:
        model_id = pick_model_id(ids, row.variant)
        tpw = measure_tokens_per_word(base_url, model_id) or 1.0
        for c in args.concurrency:
            reqs = random_requests(c * args.rounds, args.input_len, args.output_len, 0.0, seed=args.seed,
                                   tokens_per_word=tpw)
            load = LoadConfig(max_concurrency=c, seed=args.seed, num_warmups=1, progress=False)
            run = asyncio.run(run_load(Target(base_url, "/v1/completions", model_id, ignore_eos=True), reqs, load))
            s = summarize(run.records, run.duration_s)
            if s.failed:
                raise BenchmarkError(f"{row.variant} at concurrency {c}: {s.failed} requests failed {s.failures}")
            row.throughput[c] = s.output_throughput
            row.ttft_p50_ms[c] = s.ttft_ms.median if s.ttft_ms else float("nan")
            print(f"  {row.variant:>8} c={c:<3} {s.output_throughput:8.1f} out tok/s  TTFT p50 "
                  f"{row.ttft_p50_ms[c]:8.1f} ms", file=sys.stderr)


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(rows: list[VariantRow], args: argparse.Namespace, native_kv: int, native_ppl: float,
           mean_pool_ppl: dict[int, float]) -> str:
    """The markdown report: settings, the table, and the plain statement on quality.

    `mean_pool_ppl` maps a K/V head count to the perplexity of the mean-pooled variant with it."""
    levels = args.concurrency
    native = next((r.variant for r in rows if r.n_kv_heads == native_kv and r.path is None), "native")
    top = max(levels) if levels else None
    head = ["variant", "KV heads", "KV bytes/token", f"tokens @ {args.kv_budget}", f"{args.seq_len}-token seqs",
            "perplexity", "ppl / native"]
    head += [f"out tok/s @{c}" for c in levels] + ([f"TTFT p50 @{top} (ms)"] if top else [])
    lines = [f"## Attention variants of `{args.model}` ({args.dtype} KV, block size {args.block_size})", "",
             f"Perplexity: first {args.ppl_tokens} tokens of `pydoc_data.topics` (Python {platform.python_version()}),"
             f" float32, windows of {args.ppl_window} tokens, stride {args.ppl_window // 2}."]
    if levels:
        lines.append(f"Serving: {args.input_len}-token prompts, {args.output_len} new tokens (ignore_eos), "
                     f"concurrency x {args.rounds} requests per level, all variants in one server.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.variant + (" (native)" if r.variant == native else ""), str(r.n_kv_heads),
                 f"{r.bytes_per_token:,}", f"{r.capacity_tokens:,}", f"{r.concurrent_seqs:,}",
                 _fmt(r.perplexity, ".3f"), _fmt(r.ppl_ratio, ".3f")]
        cells += [_fmt(r.throughput.get(c, math.nan), ".1f") for c in levels]
        cells += [_fmt(r.ttft_p50_ms.get(top, math.nan), ".1f")] if top else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Native ({native}) perplexity: {native_ppl:.3f}. Variants with fewer K/V heads than the "
              "checkpoint are made by mean-pooling its K/V heads without uptraining (Ainslie et al. 2023): "
              "they lose quality, which uptraining on ~5% of the pre-training compute would mostly recover."]
    for r in rows:
        if r.path is not None:
            lines.append(_converted_line(r, mean_pool_ppl.get(r.n_kv_heads, math.nan)))
        elif r.n_kv_heads < native_kv:
            verdict = "loses quality" if r.ppl_ratio > 1.0 else "shows no loss on this checkpoint"
            lines.append(f"- **{r.variant} {verdict}**: mean-pooled without uptraining, perplexity {r.perplexity:.3f} "
                         f"= {r.ppl_ratio:.2f}x native ({(r.ppl_ratio - 1) * 100:+.1f}%).")
        elif r.variant != native:
            lines.append(f"- {r.variant} repeats the native K/V heads: exact (ratio {r.ppl_ratio:.3f}) at "
                         f"{r.n_kv_heads / native_kv:g}x the native KV footprint.")
    return "\n".join(lines) + "\n"


def _converted_line(r: VariantRow, mean_pool: float) -> str:
    """The statement on a converted row: its perplexity against mean-pooling, and what making it cost."""
    text = (f"- **{r.variant}** ({r.n_kv_heads} K/V heads) is the converted checkpoint `{r.path}`: perplexity "
            f"{r.perplexity:.3f} = {r.ppl_ratio:.2f}x native, against {mean_pool:.3f} mean-pooled")
    if not r.record:
        return text + " (no kvserve_convert.json beside it: budget unknown)."
    opts, budget, machine = r.record["options"], r.record["budget"], r.record.get("machine", {})
    made = "initialised only" if budget["steps"] == 0 else (f"distilled {budget['steps']} steps = "
                                                            f"{budget['tokens']:,} tokens")
    return (text + f"; `--init {opts['init']}` ({budget['calibration_tokens']:,} calibration tokens), {made}, "
            f"{budget['minutes']:.1f} min ({budget['fit_minutes']:.1f} of them the init) on "
            f"{machine.get('cpus', '?')} CPUs ({machine.get('cpu_capability', '?')}), training `--train "
            f"{opts['train']}` on standard-library docstrings.")


def plot(rows: list[VariantRow], levels: list[int], path: Path) -> None:
    """Two panels sharing the footprint axis: perplexity, and output throughput per concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    converted = [r for r in rows if r.path is not None]
    rows = sorted((r for r in rows if r.path is None), key=lambda r: r.bytes_per_token)
    x = [r.bytes_per_token for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.scatter(x, [r.perplexity for r in rows], color="tab:red", label="as converted (mean-pool / repeat)")
    if converted:
        ax1.scatter([r.bytes_per_token for r in converted], [r.perplexity for r in converted], color="tab:green",
                    marker="*", s=140, label="converted checkpoint (kvserve convert)")
        ax1.legend(fontsize=8)
    for r in rows + converted:
        ax1.annotate(r.variant, (r.bytes_per_token, r.perplexity), textcoords="offset points", xytext=(5, 5))
    ax1.set(xlabel="KV bytes per token", ylabel="perplexity (log scale, lower is better)", yscale="log",
            title="Footprint vs quality")
    for c in levels:
        ax2.plot(x, [r.throughput.get(c, math.nan) for r in rows], marker="o", label=f"concurrency {c}")
    for r in converted:
        ax2.scatter([r.bytes_per_token] * len(levels), [r.throughput.get(c, math.nan) for c in levels],
                    color="tab:green", marker="*", s=140, zorder=3)
    for r in rows + converted:
        if levels:
            ax2.annotate(r.variant, (r.bytes_per_token, r.throughput.get(max(levels), math.nan)),
                         textcoords="offset points", xytext=(5, -12 if r.path else 5))
    ax2.set(xlabel="KV bytes per token", ylabel="output tokens/s", title="Footprint vs throughput")
    if levels:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "serving not measured", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny | PATH")
    p.add_argument("--variants", default="mha,gqa-3,mqa",
                   help="comma list of native, mha, gqa-N, mqa, or NAME=DIR for a converted checkpoint (kvserve convert)")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPE_BYTES)],
                   help="KV / serving dtype; auto = what `kvserve serve --dtype auto` picks on this machine")
    p.add_argument("--kv-budget", default="1GiB", help="KV bytes per variant (footprint table and server)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the 'seqs that fit' column")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--concurrency", default="1,32", help="comma list of levels; empty to skip serving")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = concurrency * rounds")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-url", help="use this running server (started with the same --variants) instead")
    p.add_argument("--server-args", default="", help="extra `kvserve serve` options, e.g. '--attention sdpa'")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default="bench-variants", help="directory for variants.md, variants.png, server.log")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name}={value} is out of range: must be >= 1")


def run_from_args(args: argparse.Namespace) -> int:
    from kvcache.kv_cache import parse_bytes

    for name in ("block_size", "seq_len", "ppl_tokens", "rounds", "input_len", "output_len"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.ppl_window < 2:
        raise ValueError(f"--ppl-window={args.ppl_window} is out of range: must be >= 2")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--concurrency {args.concurrency!r} must be a comma list of integers such as 1,32") from None
    for c in args.concurrency:
        _positive("concurrency", c)
    budget = parse_bytes(args.kv_budget)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]  # variant names or NAME=DIR
    if not names:
        raise ValueError("--variants is empty: give a comma list such as mha,gqa-3,mqa")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch  # heavy imports only once the options are known to be good

    from model.dtypes import auto_dtype
    from model.loader import load_base
    from model.variants import with_converted, with_variant

    if args.dtype == "auto":
        args.dtype = auto_dtype("cpu")

    loaded = load_base(args.model, dtype=torch.float32, device="cpu")
    base, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
    cfg = base.config
    base.set_attention("sdpa")  # exact attention either way; sdpa is the quickest on CPU
    rows = [footprint(cfg, v, DTYPE_BYTES[args.dtype], budget, args.block_size, args.seq_len) for v in names]
    ids = text_ids(tokenizer, args.ppl_tokens + 1)
    window = min(args.ppl_window, cfg.max_seq_len)
    ppl_by_kv: dict[int, float] = {}  # variants (not converted ones) with the same K/V head count are the same model
    head_counts = [r.n_kv_heads for r in rows] + [cfg.n_kv_heads]
    for n_kv in head_counts:
        if n_kv not in ppl_by_kv:
            variant = "native" if n_kv == cfg.n_kv_heads else f"gqa-{n_kv}"
            ppl_by_kv[n_kv] = perplexity(with_variant(base, variant), ids, window, max(1, window // 2))
            print(f"  {variant:>8} perplexity {ppl_by_kv[n_kv]:.3f}", file=sys.stderr)
    native_ppl = ppl_by_kv[cfg.n_kv_heads]
    for r in rows:
        if r.path is None:
            r.perplexity = ppl_by_kv[r.n_kv_heads]
        else:
            r.perplexity = perplexity(with_converted(base, r.path, r.variant), ids, window, max(1, window // 2))
            print(f"  {r.variant:>8} perplexity {r.perplexity:.3f}", file=sys.stderr)
        r.ppl_ratio = r.perplexity / native_ppl
    del base

    if args.concurrency:
        server = None
        if args.base_url is None:
            argv = ["--model", args.model, "--variants", ",".join(names), "--dtype", args.dtype,
                    "--kv-cache-memory", str(budget), "--block-size", str(args.block_size),
                    "--max-num-seqs", str(max(64, max(args.concurrency))), *shlex.split(args.server_args)]
            server = ServerProcess(argv, free_port(), out / "server.log", args.startup_timeout)
        try:
            measure_serving(server.base_url if server is not None else args.base_url.rstrip("/"), rows, args)
        finally:
            if server is not None:
                server.close()

    text = report(rows, args, cfg.n_kv_heads, native_ppl, ppl_by_kv)
    (out / "variants.md").write_text(text, encoding="utf-8")
    plot(rows, args.concurrency, out / "variants.png")
    print(text)
    print(f"wrote {out / 'variants.md'} and {out / 'variants.png'}", file=sys.stderr)
    return 0
