"""The load generator, the locustfile and the variant report against a real tiny kvserve server."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.bench import cli
from service.bench.variants import held_text
from tests.service.live_server import LiveServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server():
    with LiveServer("--kv-cache-memory", "32MiB") as live:
        yield live.base_url


def test_closed_loop_run_writes_a_well_formed_result(server, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = cli.main(["serve", "--base-url", server, "--num-prompts", "8", "--max-concurrency", "4",
                   "--random-input-len", "32", "--random-output-len", "8", "--ignore-eos", "--num-warmups", "1",
                   "--goodput", "ttft:600000", "e2el:600000", "--result-json", str(out), "--disable-tqdm"])
    assert rc == 0
    assert "Successful requests:" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    s, reqs = doc["summary"], doc["requests"]
    assert doc["endpoint"] == "/v1/completions" and doc["model"]
    assert (s["num_requests"], s["completed"], s["failed"], s["failures"]) == (8, 8, 0, {})
    assert [r["index"] for r in reqs] == list(range(8))
    for r in reqs:
        assert r["success"] and r["status"] == 200 and r["error"] == ""
        assert r["usage_reported"] and r["output_tokens"] == 8      # ignore_eos: exactly max_tokens
        assert 0 <= r["ttft_s"] <= r["e2el_s"] and len(r["itl_s"]) <= 7
        assert r["tpot_s"] == pytest.approx((r["e2el_s"] - r["ttft_s"]) / 7)
        assert r["send_time_s"] + r["e2el_s"] <= s["duration_s"] + 1e-6
    assert s["total_output_tokens"] == 64
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs)
    assert s["output_throughput"] == pytest.approx(64 / s["duration_s"])
    assert s["goodput"] == pytest.approx(s["request_throughput"])   # generous SLOs: every request meets them
    e2el_ms = [r["e2el_s"] * 1000 for r in reqs]
    assert s["e2el_ms"]["mean"] == pytest.approx(np.mean(e2el_ms))
    assert s["ttft_ms"]["percentiles"]["p90"] == pytest.approx(np.percentile([r["ttft_s"] * 1000 for r in reqs], 90))
    assert s["itl_ms"]["count"] == sum(len(r["itl_s"]) for r in reqs)


def test_open_loop_chat_and_shared_prefix(server, tmp_path):
    out = tmp_path / "chat.json"
    rc = cli.main(["serve", "--base-url", server, "--endpoint", "/v1/chat/completions", "--dataset", "shared-prefix",
                   "--shared-prefix-len", "40", "--shared-suffix-len", "4", "--num-prompts", "6", "--output-len", "4",
                   "--request-rate", "20", "--burstiness", "0.5", "--seed", "3", "--result-json", str(out),
                   "--disable-tqdm"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["completed"] == 6 and doc["summary"]["failed"] == 0
    assert all(1 <= r["output_tokens"] <= 4 for r in doc["requests"])
    sends = [r["send_time_s"] for r in doc["requests"]]
    assert sends == sorted(sends)   # Poisson arrivals go out in order


def test_unknown_model_counts_failures_by_status(server, capsys):
    rc = cli.main(["serve", "--base-url", server, "--model", "no-such-model", "--num-prompts", "3",
                   "--random-output-len", "2", "--disable-tqdm"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"Failed requests:\s+3", out) and re.search(r"status 4\d\d:\s+3", out)


def test_locustfile_reports_ttft_and_itl(server, tmp_path):
    env = dict(os.environ, BENCH_MAX_TOKENS="6", BENCH_IGNORE_EOS="1", BENCH_NUM_PROMPTS="10")
    locustfile = os.path.join(os.path.dirname(cli.__file__), "locustfile.py")
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", locustfile, "--headless", "-u", "2", "-r", "2",
                           "-t", "20s", "--host", server, "--csv", str(tmp_path / "run"), "--only-summary"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    for name in ("TTFT", "ITL", "TPOT", "E2E"):
        assert int(rows["SSE", name]["Request Count"]) > 0, name
        assert int(rows["SSE", name]["Failure Count"]) == 0, name
    assert int(rows["POST", "/v1/completions"]["Failure Count"]) == 0
    # with ignore_eos and 6 tokens, each request yields at most 5 ITL gaps
    assert int(rows["SSE", "ITL"]["Request Count"]) <= 5 * int(rows["SSE", "E2E"]["Request Count"])


def test_variants_report_end_to_end_on_tiny(tmp_path, capsys):
    from model.loader import load_base

    rc = cli.main(["variants", "--model", "tiny", "--variants", "mha,gqa-2,mqa", "--kv-budget", "8MiB", "--dtype", "float32",
                   "--ppl-tokens", "100", "--ppl-window", "128", "--concurrency", "1,4", "--rounds", "1",
                   "--input-len", "16", "--output-len", "8", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "variants.md").read_text()
    assert md in capsys.readouterr().out
    assert (tmp_path / "variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].split()[0] in ("mha", "gqa-2", "mqa"):
            rows[cells[0].split()[0]] = cells
    assert set(rows) == {"mha", "gqa-2", "mqa"} and "(native)" in rows["gqa-2"][0]
    for variant, n_kv in (("mha", 4), ("gqa-2", 2), ("mqa", 1)):
        cells = rows[variant]
        bytes_per_token = 2 * 2 * n_kv * 16 * 4            # K and V, 2 layers, head_dim 16, float32
        usable_blocks = 8 * 2**20 // (bytes_per_token * 16)  # the null block sits beside the budget
        assert cells[1:5] == [str(n_kv), f"{bytes_per_token:,}", f"{usable_blocks * 16:,}", f"{usable_blocks // 128:,}"]
        assert all(float(c) > 0 for c in cells[7:10])      # tok/s at 1 and 4, TTFT p50 at 4
    assert rows["mha"][6] == "1.000"                      # repeating K/V heads is exact
    assert float(rows["mqa"][6]) == pytest.approx(float(rows["mqa"][5]) / float(rows["gqa-2"][5]), abs=2e-3)
    model, tokenizer = load_base("tiny")
    ids = torch.tensor(tokenizer.encode(held_text()[:1000], add_special_tokens=False)[:101])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids[None])[0, :-1].float(), ids[1:])
    assert float(rows["gqa-2"][5]) == pytest.approx(math.exp(nll.item()), rel=1e-5, abs=1e-3)
    assert re.search(r"\*\*mqa (loses quality|shows no loss on this checkpoint)\*\*: mean-pooled without uptraining, "
                     r"perplexity [\d.]+ = [\d.]+x native", md)
