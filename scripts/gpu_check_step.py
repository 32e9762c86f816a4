"""What one step of the GPU check runs in: its results, its deadline, and timers.

A step runs in its own process (see gpu_check.py). It records each of its cases in a results dict and
writes the whole dict to its part file after every case, so the orchestrator can show and keep what
a step had done even if the step is later killed at its time budget.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Statuses a case or a step can end in. "ok": ran (and every check held); "fail": a parity check did not
# hold; "error": an exception; "skip": not run, with a reason; "timeout": killed at its budget.
STATUSES = ("ok", "fail", "error", "skip", "timeout")


class StepContext:
    def __init__(self, name: str, part: Path, work: Path, deadline: float, smoke: bool, device: str,
                 context: dict[str, Any]):
        self.name = name
        self.part = part
        self.work = work  # a directory for the step's files (models); the orchestrator removes it
        self.deadline = deadline  # time.time() after which no case should start
        self.smoke = smoke
        self.device = device  # "cuda" or "cpu"
        self.context = context  # the orchestrator's JSON so far (earlier steps' results)
        self.results: dict[str, Any] = {}
        self.summary: list[str] = []
        self.status = "running"
        self.reason: str | None = None

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        doc = {"status": self.status, "reason": self.reason, "results": self.results, "summary": self.summary}
        tmp = self.part.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.part)

    def case(self, key: str, fn: Callable[[], dict[str, Any] | None], need_s: float = 0.0) -> dict[str, Any]:
        """Run one case: its dict of results (status "ok" unless it says otherwise), an "error" with the
        exception, or a "skip" when less than `need_s` seconds of the step's budget are left."""
        left = self.left()
        if left < need_s:
            result = {"status": "skip", "reason": f"step budget: {max(left, 0):.0f} s left, the case needs about {need_s:.0f} s"}
        else:
            started = time.perf_counter()
            try:
                result = dict(fn() or {})
                result.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001 (recorded; the step goes on with its next case)
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - started, 3)
        self.results[key] = result
        self.save()
        return result

    def skip(self, key: str, reason: str) -> None:
        self.results[key] = {"status": "skip", "reason": reason}
        self.save()

    def finish(self, status: str | None = None, reason: str | None = None) -> None:
        """The step's status: given, or "fail"/"error" if any case failed/errored, else "ok"."""
        if status is None:
            cases = [r for r in self.results.values() if isinstance(r, dict) and "status" in r]
            statuses = {r["status"] for r in cases}
            status = "fail" if "fail" in statuses else "error" if "error" in statuses else "ok"
            starved = sum(r["status"] == "skip" and r.get("reason", "").startswith("step budget") for r in cases)
            if starved and reason is None:
                reason = f"{starved} of {len(cases)} cases skipped: the step's budget ran out"
        self.status, self.reason = status, reason
        self.save()


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, warmup: int = 3, reps: int = 10) -> list[float]:
    """Seconds per call of fn, one figure per rep (CUDA events on the GPU, the wall clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return times


def copy_bandwidth(device: str, nbytes: int, reps: int = 20) -> dict[str, Any]:
    """Memory bandwidth of a large device-to-device copy: (bytes read + bytes written) / time."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buffers = (src, torch.empty_like(src))
    times = time_fn(lambda: buffers[1].copy_(buffers[0]), device, warmup=3, reps=reps)
    src = buffers = None  # freed before the step goes on
    if device == "cuda":
        torch.cuda.empty_cache()
    moved = 2 * nbytes
    return {
        "buffer_bytes": nbytes,
        "reps": reps,
        "median_gbs": round(moved / statistics.median(times) / 1e9, 1),
        "best_gbs": round(moved / min(times) / 1e9, 1),
    }


def bandwidth_from_context(ctx: StepContext) -> tuple[float | None, str]:
    """The env step's measured bandwidth (GB/s) and where it came from; None if that step has none."""
    env = ctx.context.get("steps", {}).get("env", {}).get("results", {})
    gbs = env.get("bandwidth", {}).get("median_gbs")
    return (float(gbs), "env step") if gbs else (None, "not measured")
