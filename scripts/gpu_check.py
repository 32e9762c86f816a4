"""The one prepared GPU check: environment and bandwidth, Triton kernel parity at real sizes, end-to-end
greedy parity against transformers (eager, compiled, CUDA graphs), and benchmarks of an 8B-shaped and a
0.6B-shaped model. `bash scripts/gpu-check.sh --help`; what each JSON field means: docs/benchmarks.md.

Each step runs in its own Python process with its own time budget, so a step that crashes, corrupts
its CUDA context or hangs loses only itself. The JSON (--out) is rewritten as results arrive, so a run
cut short still leaves what it had. `--smoke` runs every step at toy sizes (on CPU in CI: the Triton
kernels only under TRITON_INTERPRET=1), so that the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("env", "kernels", "e2e", "bench_llama8b", "bench_qwen3")
MODULES = {"env": "gpu_check_env", "kernels": "gpu_check_kernels", "e2e": "gpu_check_e2e",
           "bench_llama8b": "gpu_check_bench", "bench_qwen3": "gpu_check_bench"}
# Seconds per step, start-up of its process included; what a step leaves unused goes to the steps after
# it. The GPU budgets add up to 6 minutes.
BUDGETS = {
    "gpu": {"env": 15, "kernels": 60, "e2e": 75, "bench_llama8b": 130, "bench_qwen3": 80},
    "smoke": {"env": 60, "kernels": 90, "e2e": 90, "bench_llama8b": 90, "bench_qwen3": 90},
}
SCHEMA = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes and short runs (CI, CPU): checks that every step still runs")
    p.add_argument("--out", default="gpu-check.json", help="the JSON of results, rewritten as they come (default: %(default)s)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to run, in order (default: all: %(default)s)")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's time budget (repeatable)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if there is one")
    p.add_argument("--log-dir", help="keep each step's full output here as STEP.log (default: only the tail of a failed step, in the JSON)")
    p.add_argument("--verbose", action="store_true", help="echo each step's output as it runs")
    # the orchestrator's call of one step in a child process
    p.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--context", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.steps = [s.strip() for s in ns.steps.split(",") if s.strip()]
    unknown = [s for s in ns.steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    budgets = dict(BUDGETS["smoke" if ns.smoke else "gpu"])
    for item in ns.budget:
        name, _, seconds = item.partition("=")
        if name not in STEPS:
            p.error(f"--budget {item}: unknown step {name!r}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            p.error(f"--budget {item}: SECONDS must be a number")
        if not budgets[name] > 0:
            p.error(f"--budget {item}: SECONDS must be positive")
    ns.budgets = budgets
    return ns


# ---- one step, in a child process ---------------------------------------------------------------

def run_step(ns: argparse.Namespace) -> int:
    sys.path[:0] = [str(HERE), str(ROOT)]
    import torch
    from gpu_check_step import StepContext

    device = ns.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    context = json.loads(Path(ns.context).read_text()) if ns.context and Path(ns.context).is_file() else {}
    ctx = StepContext(ns.run_step, Path(ns.part), Path(ns.work), ns.deadline, ns.smoke, device, context)
    ctx.results["device"] = device
    ctx.save()
    if device == "cuda" and not torch.cuda.is_available():
        ctx.finish("skip", "--device cuda, but torch sees no CUDA device")
        return 0
    if device == "cpu" and not ns.smoke and ns.run_step != "env":
        ctx.finish("skip", "no CUDA device: the real sizes need a GPU (run --smoke on CPU)")
        return 0
    module = importlib.import_module(MODULES[ns.run_step])
    try:
        if ns.run_step.startswith("bench_"):
            module.run(ctx, ns.run_step.removeprefix("bench_"))
        else:
            module.run(ctx)
    except Exception as exc:  # noqa: BLE001 (a step's own set-up failed; its cases so far are kept)
        import traceback

        ctx.results["error"] = f"{type(exc).__name__}: {exc}"
        ctx.results["traceback"] = traceback.format_exc()[-3000:]
        ctx.finish("error", ctx.results["error"])
    if ctx.status == "running":
        ctx.finish()
    return 0


# ---- the orchestrator ---------------------------------------------------------------------------

def _write(doc: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out)


def _merge(entry: dict[str, Any], part: Path) -> None:
    try:
        data = json.loads(part.read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return
    entry.update(results=data.get("results", {}), summary=data.get("summary", []))
    if data.get("status") not in (None, "running"):
        entry.update(status=data["status"], reason=data.get("reason"))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the step's process group (its own: start_new_session), whatever it started included."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _supervise(proc: subprocess.Popen, part: Path, entry: dict[str, Any], doc: dict[str, Any], out: Path,
               kill_at: float) -> tuple[int, bool]:
    """Wait for the step, merging its part file into the JSON as it changes; kill it at `kill_at`.
    Returns (exit code, whether it was killed)."""
    seen = 0.0
    while True:
        try:
            return proc.wait(timeout=1.0), False
        except subprocess.TimeoutExpired:
            pass
        if part.is_file() and part.stat().st_mtime != seen:
            seen = part.stat().st_mtime
            _merge(entry, part)
            _write(doc, out)
        if time.time() > kill_at:
            _kill(proc)
            return proc.wait(), True


def _child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not smoke:
        env.pop("TRITON_INTERPRET", None)  # real sizes run the compiled kernels, never the interpreter
    return env


def orchestrate(ns: argparse.Namespace) -> int:
    out = Path(ns.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "smoke" if ns.smoke else "gpu",
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finished": None,
        "budgets_s": {s: ns.budgets[s] for s in ns.steps},
        "steps": {},
    }
    _write(doc, out)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log_dir = Path(ns.log_dir) if ns.log_dir else work
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"GPU check ({doc['mode']}): steps {', '.join(ns.steps)}; results in {out}", flush=True)
    saved = 0.0  # seconds earlier steps left unused
    for name in ns.steps:
        budget = ns.budgets[name] + saved
        entry: dict[str, Any] = {"status": "running", "reason": None, "budget_s": round(budget, 1),
                                 "base_budget_s": ns.budgets[name], "seconds": None, "results": {}, "summary": []}
        doc["steps"][name] = entry
        _write(doc, out)
        part, log, step_work = work / f"{name}.json", log_dir / f"{name}.log", work / name
        step_work.mkdir()
        started = time.time()
        # the step stops starting cases a little before its budget, and is killed at it
        deadline = started + budget - min(5.0, 0.1 * budget)
        cmd = [sys.executable, str(HERE / "gpu_check.py"), "--run-step", name, "--part", str(part),
               "--deadline", str(deadline), "--context", str(out), "--work", str(step_work), "--device", ns.device]
        if ns.smoke:
            cmd.append("--smoke")
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(ns.smoke), start_new_session=True,
                                    stdout=None if ns.verbose else log_file, stderr=subprocess.STDOUT if not ns.verbose else None)
            try:
                returncode, timed_out = _supervise(proc, part, entry, doc, out, started + budget)
            except BaseException:  # Ctrl-C or a failure here: the step must not outlive the run
                _kill(proc)
                raise
        _merge(entry, part)
        entry["seconds"] = round(time.time() - started, 1)
        saved = max(0.0, budget - (time.time() - started))
        if timed_out:
            entry.update(status="timeout", reason=f"killed at its budget of {budget:.0f} s (cases done so far are kept)")
        elif entry["status"] == "running":
            entry.update(status="error", reason=f"the step's process exited with code {returncode} before it finished")
        if entry["status"] not in ("ok", "skip") and not ns.verbose:
            entry["log_tail"] = _tail(log)
        _write(doc, out)
        _print_step(name, entry)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(doc, out)
    shutil.rmtree(work, ignore_errors=True)  # the steps' models and part files (and logs, without --log-dir)
    bad = [n for n, e in doc["steps"].items() if e["status"] not in ("ok", "skip")]
    total = sum(e["seconds"] or 0 for e in doc["steps"].values())
    print(f"\n{len(doc['steps']) - len(bad)}/{len(doc['steps'])} steps ok or skipped in {total:.0f} s"
          + (f"; not ok: {', '.join(bad)}" if bad else "") + f". Wrote {out}", flush=True)
    return 1 if bad else 0


def _print_step(name: str, entry: dict[str, Any]) -> None:
    head = f"[{name}] {entry['status']} in {entry['seconds']} s (budget {entry['budget_s']:.0f} s)"
    if entry.get("reason"):
        head += f": {entry['reason']}"
    print(head, flush=True)
    for line in entry.get("summary", []):
        print(f"    {line}", flush=True)
    for key, case in entry.get("results", {}).items():
        if isinstance(case, dict) and case.get("status") in ("fail", "error"):
            detail = case.get("error") or ", ".join(f"{k}={v}" for k, v in case.items() if k in ("max_abs_err", "max_excess", "equal", "mismatches", "first_mismatch"))
            print(f"    {key}: {case['status']} {detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.run_step:
        return run_step(ns)
    return orchestrate(ns)


if __name__ == "__main__":
    sys.exit(main())
