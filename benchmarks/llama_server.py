"""kvserve against llama.cpp's llama-server on the same GGUF, through the same load client.

    python -m benchmarks.llama_server [--out bench_results/llama] [--loads c1,c8,c32,prefill]
                                      [--kvserve-args "--quantization auto"] [--skip-llama]

Builds llama-server once (benchmarks/llama_server_build.py), then runs each server alone on the
machine (one after the other, never side by side), each in its own default environment: this
process's environment less every threading variable (OMP_*, KMP_*, GOMP_*, *_NUM_THREADS, ...), so
nothing exported for kvserve or its tests reaches the peer (OMP_WAIT_POLICY=PASSIVE puts llama.cpp's
OpenMP barriers to sleep and cost it 2.7x at one stream), and kvserve runs as `kvserve serve` ships.
Each is measured with `kvserve bench serve`:
streaming /v1/completions of random prompts with ignore_eos, closed loop at concurrency 1, 8 and
32 (128 output tokens), and prefill of ~1k-token prompts (one at a time, 1 output token, prefill
tokens/s = prompt tokens / TTFT). Both servers get the same prompts: the token estimate per word
comes from kvserve's /tokenize and is passed to both. Prints one markdown table with the ratios
the issue's targets are stated in, the CPU flags, and each server's exact command and threading
environment (also saved whole in servers.json). Not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.llama_server_build import build_llama_server
from model.dtypes import cpu_summary
from model.loader import smollm2_gguf_path

LOADS = {  # name -> kvserve bench serve options
    "c1": ["--max-concurrency", "1", "--num-prompts", "8", "--random-input-len", "128", "--random-output-len", "128"],
    "c8": ["--max-concurrency", "8", "--num-prompts", "24", "--random-input-len", "128", "--random-output-len", "128"],
    "c32": ["--max-concurrency", "32", "--num-prompts", "64", "--random-input-len", "128", "--random-output-len", "128"],
    "prefill": ["--max-concurrency", "1", "--num-prompts", "6", "--random-input-len", "1000", "--random-output-len", "1"],
}


# Variables that steer a server's threads; none may reach a server from the benchmark's environment.
THREAD_VAR_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "BLIS_", "GGML_", "LLAMA_", "KVSERVE_")
THREAD_VARS = ("MALLOC_ARENA_MAX", "LD_PRELOAD", "GOMP_CPU_AFFINITY", "VECLIB_MAXIMUM_THREADS")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def is_thread_var(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(THREAD_VAR_PREFIXES) or upper in THREAD_VARS or upper.endswith("_NUM_THREADS")


def server_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a server starts in: `environ` (default this process's) less every threading
    variable, so each server runs with its own defaults whatever the benchmark was started with."""
    environ = dict(os.environ if environ is None else environ)
    return {name: value for name, value in environ.items() if not is_thread_var(name)}


def recorded_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for the report: values of names that look like secrets replaced."""
    return {k: ("<redacted>" if any(w in k.upper() for w in _SECRET_WORDS) else v) for k, v in sorted(env.items())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server on port {port} not ready after {timeout:.0f} s")


def run_load(name: str, port: int, out: Path, server: str, tokens_per_word: float | None) -> dict:
    result = out / f"{server}_{name}.json"
    cmd = [sys.executable, "-m", "service.cli", "bench", "serve", "--port", str(port), "--ignore-eos",
           "--num-warmups", "1", "--disable-tqdm", "--result-json", str(result), *LOADS[name]]
    if tokens_per_word is not None:
        cmd += ["--tokens-per-word", f"{tokens_per_word:.4f}"]
    print(f"  {server} {name}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    with open(out / f"{server}_{name}.md", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(result.read_text())


def serve_and_measure(server: str, cmd: list[str], port: int, loads: list[str], out: Path,
                      tokens_per_word: float | None) -> dict[str, dict]:
    env = server_env()
    print(f"{server}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    servers_json = out / "servers.json"
    servers = json.loads(servers_json.read_text()) if servers_json.exists() else {}
    servers[server] = {"command": cmd, "env": recorded_env(env)}
    servers_json.write_text(json.dumps(servers, indent=1) + "\n")
    with open(out / f"{server}_server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port, proc)
        return {name: run_load(name, port, out, server, tokens_per_word) for name in loads}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def figures(doc: dict) -> dict[str, float]:
    s = doc["summary"]
    ok = [r for r in doc["requests"] if r["success"]]
    ttft = sum(r["ttft_s"] for r in ok)

    def p50(key: str) -> float | None:  # None where no request had two tokens (the prefill load)
        return s[key]["median"] if s.get(key) else None

    return {"tok_s": s["output_throughput"], "itl_p50": p50("itl_ms"), "tpot_p50": p50("tpot_ms"),
            "ttft_p50": s["ttft_ms"]["median"], "prefill_tok_s": sum(r["prompt_tokens"] for r in ok) / ttft if ttft else 0.0,
            "prompt_tokens": s["total_input_tokens"] / max(1, s["completed"]), "failed": s["failed"]}


def describe_servers(servers: dict[str, dict]) -> list[str]:
    """One line per server: its exact command and the threading variables its environment held."""
    lines = []
    for name, info in servers.items():
        threading = {k: v for k, v in info["env"].items() if is_thread_var(k)}
        shown = ", ".join(f"{k}={v}" for k, v in threading.items()) or "none (its own defaults)"
        lines.append(f"- {name}: `{shlex.join(info['command'])}`; threading variables in its environment: {shown}")
    return lines


def report(results: dict[str, dict[str, dict]], loads: list[str], servers: dict[str, dict]) -> str:
    k = {name: figures(doc) for name, doc in results.get("kvserve", {}).items()}
    ll = {name: figures(doc) for name, doc in results.get("llama", {}).items()}
    lines = [f"Machine: {cpu_summary()}; {os.cpu_count()} CPUs. llama.cpp from llama-cpp-python 0.3.36 "
             "(GGML_NATIVE), same GGUF (Q4_1). Servers (full environments in servers.json):",
             *describe_servers(servers), "",
             "| load | llama-server | kvserve | kvserve / llama-server | target |", "|---|---:|---:|---:|---|"]

    def row(label: str, key: str, name: str, fmt: str, higher_better: bool, target: str) -> None:
        if name not in k and name not in ll:
            return
        a, b = ll.get(name, {}).get(key), k.get(name, {}).get(key)
        ratio = f"{b / a:.2f}x" if a and b else "-"
        if a and b and not higher_better:
            ratio = f"{b / a:.2f}x (lower is better)"
        lines.append(f"| {label} | {fmt.format(a) if a else '-'} | {fmt.format(b) if b else '-'} | {ratio} | {target} |")

    row("c=1 output tok/s", "tok_s", "c1", "{:.1f}", True, "")
    row("c=1 ITL p50 (ms)", "itl_p50", "c1", "{:.1f}", False, "<= 1.5x")
    row("c=1 TTFT p50 (ms)", "ttft_p50", "c1", "{:.0f}", False, "")
    row("c=8 output tok/s", "tok_s", "c8", "{:.1f}", True, ">= 1x")
    row("c=8 ITL p50 (ms)", "itl_p50", "c8", "{:.1f}", False, "")
    row("c=32 output tok/s", "tok_s", "c32", "{:.1f}", True, ">= 1.5x")
    row("c=32 TTFT p50 (ms)", "ttft_p50", "c32", "{:.0f}", False, "")
    row("prefill tok/s (~1k-token prompts)", "prefill_tok_s", "prefill", "{:.0f}", True, "no worse than before")
    row("prefill TTFT p50 (ms)", "ttft_p50", "prefill", "{:.0f}", False, "")
    failed = {f"{srv} {name}": f["failed"] for srv, figs in (("kvserve", k), ("llama-server", ll))
              for name, f in figs.items() if f["failed"]}
    if failed:
        lines.append(f"\nFailed requests: {failed}")
    prompt = {name: f"{f['prompt_tokens']:.0f}" for name, f in k.items()}
    lines.append(f"\nPrompt tokens per request (kvserve's count): {prompt}. Loads: " +
                 "; ".join(f"{name}: {' '.join(LOADS[name])}" for name in loads) +
                 " (each with --ignore-eos --num-warmups 1, streaming /v1/completions).")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results/llama_server")
    p.add_argument("--loads", default="c1,c8,c32,prefill")
    p.add_argument("--kvserve-args", default="", help="extra `kvserve serve` options, e.g. '--quantization q4'")
    p.add_argument("--skip-llama", action="store_true", help="measure kvserve only")
    p.add_argument("--report-only", action="store_true", help="print the table from the results already in --out")
    args = p.parse_args()
    loads = args.loads.split(",")
    for name in loads:
        if name not in LOADS:
            p.error(f"unknown load {name!r}: choose from {', '.join(LOADS)}")
    out = Path(args.out)
    if args.report_only:
        saved = {server: {name: json.loads((out / f"{server}_{name}.json").read_text()) for name in loads
                          if (out / f"{server}_{name}.json").exists()} for server in ("kvserve", "llama")}
        servers = json.loads((out / "servers.json").read_text()) if (out / "servers.json").exists() else {}
        print(report(saved, loads, servers))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "servers.json").unlink(missing_ok=True)
    gguf = smollm2_gguf_path()
    binary = None if args.skip_llama else build_llama_server()

    results: dict[str, dict[str, dict]] = {}
    port = free_port()
    kvserve = Path(sys.executable).with_name("kvserve")  # the installed command, as a user runs it
    kv_cmd = [str(kvserve), "serve", "--port", str(port), "--log-level", "warning",
              *shlex.split(args.kvserve_args)]
    results["kvserve"] = serve_and_measure("kvserve", kv_cmd, port, loads, out, None)
    tokens_per_word = next(iter(results["kvserve"].values()))["tokens_per_word"]
    if binary is not None:
        port = free_port()
        ll_cmd = [str(binary), "-m", str(gguf), "-t", "2", "-np", "32", "-c", "32768", "--host", "127.0.0.1",
                  "--port", str(port)]
        results["llama"] = serve_and_measure("llama", ll_cmd, port, loads, out, tokens_per_word)
    table = report(results, loads, json.loads((out / "servers.json").read_text()))
    (out / "report.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
