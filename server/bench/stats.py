"""Figures of a benchmark run: client-side latency statistics, server /metrics deltas, process CPU and RSS."""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.bench.client import RequestResult
from server.bench.target import BenchError

PERCENTILES = (50, 90, 99)
METRIC_PREFIXES = ("pagedserve:", "vllm:")


def load_average() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def distribution(values_s: list[float]) -> dict[str, float | None]:
    """mean, std and percentiles in milliseconds (None when there are no values)."""
    if not values_s:
        return {"mean": None, "std": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "std": float(arr.std())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:100 e2el:20000` (milliseconds) -> {"ttft": 0.5, ...} in seconds."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            name, _, value = part.partition(":")
            name = name.strip().lower()
            if name not in ("ttft", "tpot", "e2el", "itl"):
                raise BenchError(f"unknown goodput SLO {name!r}: use ttft, tpot, itl (p99 of the request) or e2el")
            slos[name] = float(value) / 1000.0
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    checks = {
        "ttft": r.ttft,
        "tpot": r.tpot if r.tpot is not None else 0.0,
        "e2el": r.latency,
        "itl": max(r.itl) if r.itl else 0.0,
    }
    return all(checks[name] <= limit for name, limit in slos.items())


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    itl = [gap for r in ok for gap in r.itl]
    tpot = [t for t in (r.tpot for r in ok) if t is not None]
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(Counter(r.error.splitlines()[0][:160] for r in failed).most_common(5)),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution(tpot),
        "itl_ms": distribution(itl),
        "e2el_ms": distribution([r.latency for r in ok]),
        "input_len_mismatches": sum(1 for r in ok if r.prompt_tokens != r.expected_prompt_len),
        "output_len_mismatches": sum(1 for r in ok if r.output_tokens != r.expected_output_len),
        "peak_concurrency": _peak_concurrency(ok),
    }
    if slos:
        good = sum(1 for r in results if meets_slos(r, slos))
        summary["goodput"] = {
            "slos_ms": {k: v * 1000.0 for k, v in slos.items()},
            "good_requests": good,
            "request_goodput": good / duration if duration > 0 else 0.0,
            "good_fraction": good / len(results) if results else 0.0,
        }
    return summary


def _peak_concurrency(results: list[RequestResult]) -> int:
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# ---- Prometheus text format ---------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample per metric name (labels folded together)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        totals[m.group(1)] = totals.get(m.group(1), 0.0) + value
    return totals


def _find(metrics: dict[str, float], suffix: str) -> tuple[str | None, float | None]:
    for prefix in METRIC_PREFIXES:
        name = prefix + suffix
        if name in metrics:
            return prefix, metrics[name]
    return None, None


def metrics_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """Server-side figures over the run from two /metrics scrapes (pagedserve: or vllm: names)."""
    if not before or not after:
        return {"available": False}
    out: dict[str, Any] = {"available": True}
    prefix = None
    for key, suffix in (
        ("prefix_cache_queries", "prefix_cache_queries_total"),
        ("prefix_cache_hits", "prefix_cache_hits_total"),
        ("prompt_tokens", "prompt_tokens_total"),
        ("generation_tokens", "generation_tokens_total"),
        ("preemptions", "num_preemptions_total"),
    ):
        p, end = _find(after, suffix)
        _, start = _find(before, suffix)
        if end is not None:
            prefix = prefix or p
            out[key] = end - (start or 0.0)
    out["metric_prefix"] = prefix
    queries = out.get("prefix_cache_queries")
    out["prefix_cache_hit_rate"] = (out.get("prefix_cache_hits", 0.0) / queries) if queries else None
    return out


# ---- the server process: CPU seconds and resident memory ----------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime seconds) of a process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                parents.setdefault(st[0], []).append(int(name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(parents.get(pid, []))
    return tree


@dataclass
class ProcessMonitor:
    """Polls a server process and its children: CPU seconds used over the run, peak summed RSS, max VmHWM."""

    pid: int
    interval: float = 0.25
    _first_cpu: dict[int, float] = field(default_factory=dict)
    _last_cpu: dict[int, float] = field(default_factory=dict)
    peak_rss_kib: int = 0
    max_hwm_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _poll(self, initial: bool = False) -> None:
        rss = 0
        for pid in process_tree(self.pid):
            st = _stat(pid)
            if st is None:
                continue
            if pid not in self._first_cpu:
                self._first_cpu[pid] = st[1] if initial else 0.0  # born during the run: all of its CPU counts
            self._last_cpu[pid] = st[1]
            rss += _status_kib(pid, "VmRSS")
            self.max_hwm_kib = max(self.max_hwm_kib, _status_kib(pid, "VmHWM"))
        self.peak_rss_kib = max(self.peak_rss_kib, rss)

    def start(self) -> ProcessMonitor:
        if not os.path.exists(f"/proc/{self.pid}"):
            raise BenchError(f"--pid {self.pid}: no such process on this machine")
        self._poll(initial=True)
        self._thread = threading.Thread(target=self._run, name="bench-procmon", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def stop(self, duration: float) -> dict[str, Any]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._poll()
        cpu = sum(self._last_cpu[p] - self._first_cpu[p] for p in self._last_cpu)
        return {
            "pid": self.pid,
            "processes": len(self._last_cpu),
            "cpu_seconds": cpu,
            "cpu_utilization": cpu / duration if duration > 0 else None,
            "peak_rss_mib": self.peak_rss_kib / 1024.0,
            "max_vmhwm_mib": self.max_hwm_kib / 1024.0,
        }
