"""The peer benchmark starts every server in its own default environment: nothing exported for kvserve
or the tests (OMP_WAIT_POLICY=PASSIVE above all) may reach llama-server."""
from __future__ import annotations

import json
import os

from benchmarks.llama_server import describe_servers, recorded_env, server_env

HOSTILE = {
    "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "OMP_PROC_BIND": "close", "KMP_BLOCKTIME": "0",
    "KMP_AFFINITY": "compact", "GOMP_SPINCOUNT": "0", "GOMP_CPU_AFFINITY": "0", "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1", "TORCH_NUM_THREADS": "1", "GGML_NTHREADS": "1", "KVSERVE_THREADS": "1",
    "MALLOC_ARENA_MAX": "2", "LD_PRELOAD": "/tmp/libslow.so", "omp_wait_policy": "passive",
}


def test_server_env_drops_every_threading_variable():
    base = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    env = server_env({**base, **HOSTILE})
    assert env == base


def test_server_env_defaults_to_this_process_environment(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("KMP_BLOCKTIME", "0")
    monkeypatch.setenv("KVSERVE_BENCH_MARKER", "x")
    env = server_env()
    assert "OMP_WAIT_POLICY" not in env and "KMP_BLOCKTIME" not in env and "KVSERVE_BENCH_MARKER" not in env
    assert env["PATH"] == os.environ["PATH"]


def test_report_shows_each_server_command_and_threading_environment():
    servers = {"llama": {"command": ["llama-server", "-t", "2"], "env": recorded_env(server_env({"PATH": "/bin", **HOSTILE}))},
               "kvserve": {"command": ["kvserve", "serve"], "env": recorded_env({"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE",
                                                                                    "API_KEY": "s3cret"})}}
    lines = describe_servers(servers)
    assert lines[0] == "- llama: `llama-server -t 2`; threading variables in its environment: none (its own defaults)"
    assert lines[1].endswith("threading variables in its environment: OMP_WAIT_POLICY=PASSIVE")
    assert "s3cret" not in json.dumps(servers)
