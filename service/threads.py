"""How many torch threads to run: the CPUs this process may use, split between its engines.

torch sizes its intra-op pool from the CPUs it sees at import: it honours the affinity mask
(`taskset`, a cpuset) and OMP_NUM_THREADS, but not a CFS quota, so a pod limited to 4 CPUs on a
64-core node runs 64 threads in 4 CPUs' worth of time and is throttled every period. This module
reads what the process may really use:
- the affinity mask (`os.sched_getaffinity`);
- the cgroup CPU quota: v2 `cpu.max` ("200000 100000" = 2 CPUs, "max" = none) or v1
  `cpu.cfs_quota_us` / `cpu.cfs_period_us`, on the process's own cgroup and every ancestor up to
  the mount (the tightest wins), rounded up to whole CPUs;
- OMP_NUM_THREADS, when set, as the operator's explicit choice (the Dockerfile, compose file and
  Kubernetes manifests set it from the CPU limit).
`plan_threads` turns that (or `--threads`) into one count per engine. Each engine thread sets its
own count (OpenMP's thread count is per calling thread), so several variants in one process split
the CPUs instead of each running a full pool on them. No torch import here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True, slots=True)
class CpuLimit:
    """The CPUs this process may use, and what limits them."""
    affinity: int                 # CPUs in the affinity mask
    quota: float | None           # cgroup CPU quota in CPUs (None: no quota)

    @property
    def cpus(self) -> int:
        """Whole CPUs: the affinity mask, lowered to the quota rounded up (never below 1)."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(self.quota - 1e-9)))


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    total: int                    # threads for the whole process (loading the model uses them all)
    per_engine: int               # each engine thread's intra-op threads
    num_engines: int
    source: str                   # where `total` came from, for the start-up log line

    def describe(self) -> str:
        return (f"torch threads: {self.per_engine} per engine x {self.num_engines} "
                f"engine{'s' if self.num_engines != 1 else ''} (total {self.total}; {self.source})")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_self_cgroup: Path) -> tuple[str | None, str | None]:
    """The process's cgroup v2 path and its v1 `cpu` controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(proc_self_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(mount: Path, path: str | None) -> list[Path]:
    """mount/path and each parent up to the mount itself. Inside a container's cgroup namespace
    /proc/self/cgroup says "/" and the mount is the container's own cgroup."""
    parts = [p for p in (path or "").split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()] or [mount]


def _quota_v2(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _quota_v1(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0 or int(period) <= 0:
        return None  # -1: no quota
    return int(quota) / int(period)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup or its ancestors, in CPUs; None if none."""
    v2_path, v1_path = _cgroup_paths(proc_self_cgroup)
    quotas: list[float] = []
    if v2_path is not None:
        # a pure v2 host mounts the unified hierarchy at the root; a hybrid one under "unified"
        mount = root if (root / "cgroup.controllers").exists() else root / "unified"
        quotas += [q for d in _ancestors(mount, v2_path) if (q := _quota_v2(d)) is not None]
    if v1_path is not None:
        v1_mount = next((root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                         if (root / name / "cpu.cfs_quota_us").exists()), None)
        if v1_mount is not None:
            quotas += [q for d in _ancestors(v1_mount, v1_path) if (q := _quota_v1(d)) is not None]
    return min(quotas) if quotas else None


def cpu_limit(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> CpuLimit:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuLimit(affinity=affinity, quota=cgroup_cpu_quota(root, proc_self_cgroup))


def omp_num_threads(environ) -> int | None:
    """OMP_NUM_THREADS as a positive int (its first value, as in "4,2"), or None if unset or unusable."""
    text = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def plan_threads(requested: int | None, num_engines: int, *, environ=None, limit: CpuLimit | None = None) -> ThreadPlan:
    """`requested` (--threads) or else OMP_NUM_THREADS or else the CPU limit, split evenly between
    `num_engines` engines (each at least 1: with more engines than CPUs they share cores)."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        total, source = requested, "--threads"
    elif (omp := omp_num_threads(environ)) is not None:
        total, source = omp, "OMP_NUM_THREADS"
    else:
        limit = limit or cpu_limit()
        quota = "none" if limit.quota is None else f"{limit.quota:g} CPUs"
        total, source = limit.cpus, f"CPUs this process may use: affinity {limit.affinity}, cgroup quota {quota}"
    return ThreadPlan(total=total, per_engine=max(1, total // num_engines), num_engines=num_engines, source=source)
