"""service.threads: CPU limits read from cgroup v1 / v2 trees (built here as files, in the layouts
Docker, Kubernetes and systemd produce), the thread plan, and the real command line under
`taskset -c 0`, which must size torch to 1 thread."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.threads import CpuLimit, cgroup_cpu_quota, cpu_limit, omp_num_threads, plan_threads

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_host(tmp_path: Path, cgroup: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A pure cgroup v2 mount; `limits` maps a cgroup path to its cpu.max."""
    root = tmp_path / "sys"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids")
    for path, cpu_max in limits.items():
        write(root / path.strip("/") / "cpu.max", cpu_max)
    (root / cgroup.strip("/")).mkdir(parents=True, exist_ok=True)
    write(tmp_path / "proc_cgroup", f"0::{cgroup}\n")
    return root, tmp_path / "proc_cgroup"


def test_v2_quota_of_the_own_cgroup(tmp_path):
    root, proc = v2_host(tmp_path, "/kubepods/pod1/ctr", {"/kubepods/pod1/ctr": "250000 100000"})
    assert cgroup_cpu_quota(root, proc) == 2.5


def test_v2_the_tightest_ancestor_wins(tmp_path):
    root, proc = v2_host(tmp_path, "/kubepods/pod1/ctr", {
        "/kubepods/pod1/ctr": "max 100000", "/kubepods/pod1": "150000 100000", "/kubepods": "800000 100000"})
    assert cgroup_cpu_quota(root, proc) == 1.5


def test_v2_without_a_quota(tmp_path):
    root, proc = v2_host(tmp_path, "/user.slice", {"/user.slice": "max 100000"})
    assert cgroup_cpu_quota(root, proc) is None


def test_v2_in_a_container_namespace_reads_the_mount_itself(tmp_path):
    # /proc/self/cgroup says "/" and the container's own cgroup is mounted at the root
    root, proc = v2_host(tmp_path, "/", {"/": "400000 100000"})
    assert cgroup_cpu_quota(root, proc) == 4.0


def test_v1_docker_layout(tmp_path):
    # cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host path, but the
    # container sees only its own cgroup at the mount
    root = tmp_path / "sys"
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "50000")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    write(tmp_path / "proc_cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_quota(root, tmp_path / "proc_cgroup") == 0.5


def test_v1_host_layout_with_nested_cgroups_and_no_quota(tmp_path):
    root = tmp_path / "sys"
    for d, quota in (("cpu", "-1"), ("cpu/kvserve", "-1")):
        write(root / d / "cpu.cfs_quota_us", quota)
        write(root / d / "cpu.cfs_period_us", "100000")
    write(tmp_path / "proc_cgroup", "1:cpu:/kvserve\n2:cpuacct:/kvserve\n")
    assert cgroup_cpu_quota(root, tmp_path / "proc_cgroup") is None
    write(root / "cpu" / "kvserve" / "cpu.cfs_quota_us", "300000")
    assert cgroup_cpu_quota(root, tmp_path / "proc_cgroup") == 3.0


def test_no_cgroup_files_at_all(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "no_proc_file") is None


@pytest.mark.parametrize("affinity,quota,cpus", [(64, None, 64), (64, 4.0, 4), (64, 2.5, 3), (2, 8.0, 2),
                                                 (8, 0.5, 1), (1, None, 1)])
def test_cpus_is_the_affinity_lowered_to_the_quota_rounded_up(affinity, quota, cpus):
    assert CpuLimit(affinity, quota).cpus == cpus


def test_this_process_limit_matches_its_affinity():
    limit = cpu_limit()
    assert limit.affinity == len(os.sched_getaffinity(0))
    assert 1 <= limit.cpus <= limit.affinity


@pytest.mark.parametrize("text,value", [("4", 4), ("2,1", 2), (" 3 ", 3), ("0", None), ("x", None), ("", None)])
def test_omp_num_threads(text, value):
    assert omp_num_threads({"OMP_NUM_THREADS": text}) == value


def test_plan_prefers_the_option_then_omp_num_threads_then_the_cpu_limit():
    limit = CpuLimit(affinity=64, quota=4.0)
    assert plan_threads(6, 1, environ={"OMP_NUM_THREADS": "2"}, limit=limit).total == 6
    omp = plan_threads(None, 1, environ={"OMP_NUM_THREADS": "2"}, limit=limit)
    assert (omp.total, omp.source) == (2, "OMP_NUM_THREADS")
    auto = plan_threads(None, 1, environ={}, limit=limit)
    assert (auto.total, auto.per_engine) == (4, 4)
    assert auto.describe() == ("torch threads: 4 per engine x 1 engine (total 4; CPUs this process may use: "
                               "affinity 64, cgroup quota 4 CPUs)")


@pytest.mark.parametrize("total,engines,per_engine", [(4, 2, 2), (4, 3, 1), (2, 3, 1), (8, 1, 8), (1, 1, 1)])
def test_plan_splits_evenly_between_engines(total, engines, per_engine):
    plan = plan_threads(total, engines, environ={})
    assert (plan.total, plan.per_engine, plan.num_engines) == (total, per_engine, engines)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to show that taskset lowers the count")
def test_under_taskset_one_cpu_the_server_runs_one_thread():
    taskset = shutil.which("taskset")
    assert taskset, "taskset (util-linux) is missing"
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("KVSERVE_")}
    proc = subprocess.Popen([taskset, "-c", str(cpu), sys.executable, "-m", "service.cli", "serve", "--model", "tiny",
                             "--dtype", "float32", "--kv-cache-memory", "1MiB", "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # until it serves (or exits)
            lines.append(line)
            if "kvserve listening on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(60)
    log = "".join(lines)
    assert "torch threads: 1 per engine x 1 engine (total 1; CPUs this process may use: affinity 1," in log, log
