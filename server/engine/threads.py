"""How many compute threads the engine runs, and on which cores: the cores this process may use.

The cores a process may use are its affinity mask, cut to the cgroup's CPU quota (a container limited to
4 CPUs on a 64-core host gets 4 threads, not 64: more threads than the quota only get throttled). cgroup
v2 `cpu.max` ("QUOTA PERIOD", or "max") and v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none) are
read at the cgroup mount; inside a container that is the container's own cgroup. `OMP_NUM_THREADS`,
when set, still decides the count. With at least `SPLIT_FROM` cores the API process (HTTP, tokenization)
keeps one and the engine computes on the rest: where the affinity mask is the limit (taskset, a cpuset,
Kubernetes' static CPU manager) each process is pinned to its own cores (a process-wide affinity mask;
torch's OpenMP threads are not bound one by one, see `plan_threads`); where a quota is, the engine runs
one thread fewer and nothing is pinned. With fewer cores both share them all, as one core less would cost
the engine more than the API's contention does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SPLIT_FROM = 4  # cores at which the API process gets one of its own
DECODE_ALL_FROM = 16  # decode batch at which decode-only steps use every thread again (see ThreadPlan)


@dataclass(frozen=True)
class ThreadPlan:
    engine_threads: int  # steps with prefill work (compute-bound: every thread pays)
    one_process_threads: int  # with the engine on a thread of the API process: every usable core
    engine_cores: tuple[int, ...]  # the engine process's affinity
    api_cores: tuple[int, ...]  # the API process's affinity (the engine's when they share)
    reason: str  # one line for the start-up log
    # Decode-only steps of fewer than `decode_all_from` sequences: one thread fewer where the API process
    # shares the cores. A small decode step is hundreds of tiny parallel regions, and each one waits at its
    # barrier for the thread that the API process (HTTP, detokenizing, SSE) has just preempted: on 2 cores
    # a 125M model decoded one stream at 41 ms per token with 2 threads and 24 ms with 1 (docs/benchmarks.md).
    # From `DECODE_ALL_FROM` sequences the step's GEMMs are wide enough for every thread to pay: decode
    # steps of the bfloat16 125M Llama served on 2 cores (2026-12-02, native decode attention), 1 and 2
    # threads alternating step by step in one run (load 0.9-1.5), took 2/1 = 0.93-0.99 of the time at 1-8
    # sequences, 0.84 at 16 and 0.80 at 32. With others' processes busy on the cores (load 1.5-2.4) 2
    # threads gained nothing at any batch (1.03-1.06), so the rule stays one threshold, not a finer curve.
    # End to end (bench compare, 128 in / 128 out, two A/B rounds, load 1.6-2.9) against decoding every
    # batch on 1 thread: TPOT p50 at concurrency 16 40-43 ms against 46-49, at 32 75-77 against 78-87;
    # output tok/s 316 against 274 in one round and even (337 / 342) in the other (±15 % run to run here).
    decode_threads: int = 0  # 0: engine_threads
    decode_all_from: int = 0  # decode batch from which decode-only steps take engine_threads too

    def threads_for(self, prefill: bool, decode_batch: int) -> int:
        """Threads for the next step: all for prefill work or `decode_all_from` decoding sequences and up."""
        if prefill or not self.decode_threads or decode_batch >= self.decode_all_from:
            return self.engine_threads
        return self.decode_threads

    def describe(self) -> str:
        decode = ""
        if self.decode_threads and self.decode_threads != self.engine_threads:
            decode = f" ({self.decode_threads} for decode-only steps of fewer than {self.decode_all_from} sequences)"
        return (
            f"Compute threads: {self.engine_threads}{decode} on cores {_ranges(self.engine_cores)}; API process on "
            f"{_ranges(self.api_cores)} ({self.reason})"
        )


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the cgroup's quota allows (rounded up), or None where there is no quota or no readable cgroup file."""
    try:
        return _read_cgroup_cpu_limit(root)
    except (OSError, ValueError):  # unreadable or malformed: no limit known, as without a cgroup
        return None


def _read_cgroup_cpu_limit(root: Path) -> int | None:
    v2 = root / "cpu.max"
    if v2.is_file():
        fields = v2.read_text().split()
        if len(fields) < 2 or fields[0] == "max":
            return None
        return _cpus(int(fields[0]), int(fields[1]))
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota, period = root / name / "cpu.cfs_quota_us", root / name / "cpu.cfs_period_us"
        if quota.is_file() and period.is_file():
            return _cpus(int(quota.read_text()), int(period.read_text()))
    return None


def _cpus(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:  # v1 writes -1 for no quota
        return None
    return max(1, math.ceil(quota / period))


def plan_threads(
    affinity: set[int] | None = None, cpu_limit: int | None = None, omp_num_threads: str | None = None
) -> ThreadPlan:
    """The plan for this process's affinity and cgroup (read when not given) and `OMP_NUM_THREADS`.

    Only process affinity is set, not per-thread binding (OMP_PROC_BIND / GOMP_CPU_AFFINITY): binding
    had nothing to measure it on (a shared 2-core machine), and under a CPU quota without exclusive cores
    a thread bound to a busy core waits where an unbound one would move."""
    if affinity is None:
        affinity = os.sched_getaffinity(0)
        cpu_limit = cgroup_cpu_limit()
    cores = sorted(affinity)
    limited = cpu_limit is not None and cpu_limit < len(cores)
    count = cpu_limit if limited else len(cores)
    why = f"{len(cores)} cores in the affinity mask" + (
        f", cgroup quota {cpu_limit} CPUs" if cpu_limit is not None else ", no cgroup CPU quota"
    )
    decode = 0
    if count < SPLIT_FROM:
        engine = api = tuple(cores)
        threads = count
        decode = max(1, count - 1)
        why += f"; fewer than {SPLIT_FROM}: API and engine share them"
    elif limited:  # the quota is CPU time on any core of the mask, not cores of our own: count, don't pin
        engine = api = tuple(cores)
        threads = count - 1
        why += "; one CPU of the quota left to the API process, no pinning (the cores are not ours alone)"
    else:
        engine, api = tuple(cores[:-1]), (cores[-1],)
        threads = len(engine)
        why += "; the API process on a core of its own"
    one_process = count
    if omp_num_threads is None:
        omp_num_threads = os.environ.get("OMP_NUM_THREADS")
    if omp_num_threads:
        try:
            threads = one_process = max(1, int(omp_num_threads))
            decode = 0
            why += f"; OMP_NUM_THREADS={omp_num_threads} sets the count"
        except ValueError:
            why += f"; OMP_NUM_THREADS={omp_num_threads!r} is not a number and is ignored"
    return ThreadPlan(threads, one_process, engine, api, why, decode, DECODE_ALL_FROM)


def _ranges(cores: tuple[int, ...]) -> str:
    """0-3,8 style."""
    parts: list[str] = []
    start = prev = None
    for core in cores:
        if prev is not None and core == prev + 1:
            prev = core
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = core
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)
