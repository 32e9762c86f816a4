"""`pagedserve bench compare`: our server and vLLM's CPU build, one after the other, same everything.

Each server is started on the same model with the same dtype, max model length, KV cache size,
sequence and token budgets and compute-thread count, loaded with the same client and workload
(`bench serve`), and stopped before the next starts. `--rounds 2` runs A/B/A/B. Writes
NAME.json (every figure), NAME.md (a table with ours/vLLM ratios) and, for sweeps, NAME.png.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from server.bench.serve import run_sweep, sweep_points, write_json
from server.bench.stats import load_average
from server.bench.target import BenchError

SERVERS = ("pagedserve", "vllm")


def find_peer_script(explicit: str | None) -> Path:
    candidates = [explicit] if explicit else []
    candidates.append(os.environ.get("PAGEDSERVE_VLLM_PEER_SCRIPT"))
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo / "shared" / "peers" / "run_vllm_peer.sh", repo.parent / "shared" / "peers" / "run_vllm_peer.sh"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError("run_vllm_peer.sh not found: pass --peer-script or set PAGEDSERVE_VLLM_PEER_SCRIPT")


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} during startup")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200 and httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


class OurServer:
    name = "pagedserve"

    def __init__(self, ns: argparse.Namespace, log: Path):
        self.ns, self.log, self.proc = ns, log, None
        self.url = f"http://127.0.0.1:{ns.port}"

    def command(self) -> list[str]:
        ns = self.ns
        return [sys.executable, "-m", "server", "serve", ns.model, "--host", "127.0.0.1", "--port", str(ns.port),
                "--dtype", ns.dtype, "--max-model-len", str(ns.max_model_len),
                "--kv-cache-memory", str(ns.kv_cache_gib), "--max-num-seqs", str(ns.max_num_seqs),
                "--max-num-batched-tokens", str(ns.max_num_batched_tokens), "--disable-access-log"]

    def start(self) -> int:
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        if self.ns.threads != "auto":
            env["OMP_NUM_THREADS"] = str(self.ns.threads)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        wait_ready(self.url, self.proc, self.ns.startup_timeout)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class VllmServer:
    name = "vllm"

    def __init__(self, ns: argparse.Namespace, log: Path):
        self.ns, self.log, self.pid = ns, log, None
        self.script = find_peer_script(ns.peer_script)
        self.url = f"http://127.0.0.1:{ns.peer_port}"

    def threads_bind(self) -> str:
        if self.ns.peer_threads_bind:
            return self.ns.peer_threads_bind
        # auto on a 2-core box: one OpenMP compute thread, the other core kept for vLLM's API process
        return "auto" if self.ns.threads in ("auto", 1) else f"0-{self.ns.threads - 1}"

    def command(self) -> list[str]:
        ns = self.ns
        return ["bash", str(self.script), "start", "--model", ns.model, "--port", str(ns.peer_port),
                "--dtype", ns.peer_dtype, "--kv-gib", f"{ns.kv_cache_gib:g}", "--max-model-len", str(ns.max_model_len),
                "--threads-bind", self.threads_bind(), "--log", str(self.log), "--timeout", str(int(ns.startup_timeout)),
                "--", "--max-num-seqs", str(ns.max_num_seqs), "--max-num-batched-tokens", str(ns.max_num_batched_tokens)]

    def start(self) -> int:
        out = subprocess.run(self.command(), capture_output=True, text=True, env=dict(os.environ), check=False)
        if out.returncode != 0:
            raise BenchError(f"vLLM peer failed to start: {(out.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
        self.pid = int(out.stdout.strip().splitlines()[-1])
        wait_ready(self.url, None, 60)
        return self.pid

    def stop(self) -> None:
        if self.pid:
            subprocess.run(["bash", str(self.script), "stop", str(self.pid)], capture_output=True, text=True, check=False)
            self.pid = None


def source_revision() -> str | None:
    """Commit of our server's code (with +dirty when tracked files differ), for the record."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def default_name(ns: argparse.Namespace) -> str:
    model = Path(ns.model).name
    if ns.dataset == "random":
        work = f"random{ns.input_len}x{ns.output_len}"
    else:
        work = ns.dataset
    sweep = ("c" + "-".join(map(str, ns.concurrency))) if ns.concurrency else \
        ("r" + "-".join("inf" if math.isinf(r) else f"{r:g}" for r in ns.request_rate))
    return f"{model}-{ns.endpoint}-{work}-{sweep}"


def run_compare(ns: argparse.Namespace) -> int:
    from server.bench.cli import run_config_from, workload_from

    out_dir = Path(ns.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = ns.name or default_name(ns)
    order = [s.strip() for s in ns.servers.split(",") if s.strip()]
    for s in order:
        if s not in SERVERS:
            raise BenchError(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    points = sweep_points(ns.concurrency, ns.request_rate)
    if ns.max_concurrency and not ns.concurrency:
        points = [(rate, ns.max_concurrency) for rate, _ in points]
    spec = workload_from(ns)
    ns.served_model = None
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in order}
    revision = source_revision()
    for round_index in range(ns.rounds):
        for server_name in order:
            log = out_dir / f"{name}.{server_name}.r{round_index}.log"
            server = OurServer(ns, log) if server_name == "pagedserve" else VllmServer(ns, log)
            print(f"[compare] round {round_index + 1}/{ns.rounds}: starting {server_name} "
                  f"(load {load_average()[:1]})", flush=True)
            started = time.monotonic()
            try:
                pid = server.start()
                startup = time.monotonic() - started
                print(f"[compare] {server_name} ready in {startup:.0f}s (pid {pid})", flush=True)
                config = run_config_from(ns, server.url, pid)
                sweep = asyncio.run(run_sweep(config, spec, points, ns.tokenizer or ns.model, ns.num_prompts, ns.max_model_len))
                sweep.update({"server": server_name, "round": round_index, "startup_s": startup,
                              "command": server.command()})
                results[server_name].append(sweep)
            finally:
                server.stop()
    report = {
        "name": name,
        "model": ns.model,
        "settings": {k: getattr(ns, k) for k in ("dtype", "peer_dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                                                   "kv_cache_gib", "threads", "endpoint", "rounds")},
        "workload": spec.describe(),
        "sweep": [{"request_rate": "inf" if math.isinf(r) else r, "max_concurrency": c} for r, c in points],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "pagedserve_revision": revision,
        "results": results,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    markdown = format_markdown(report)
    report["markdown"] = markdown
    write_json(out_dir / f"{name}.json", _strip_requests(report))
    (out_dir / f"{name}.md").write_text(markdown + "\n", "utf-8")
    print(markdown)
    if len(points) > 1:
        try:
            from server.bench.plot import plot_sweep

            png = plot_sweep(report, out_dir / f"{name}.png")
            print(f"[compare] chart: {png}")
        except ImportError:
            print("[compare] matplotlib is not installed (pip install 'pagedserve[bench]'): no chart")
    failed = sum(run["failed"] for sweeps in results.values() for sweep in sweeps for run in sweep["runs"])
    return 0 if failed == 0 else 1


def rerender(paths: list[str], chart: bool = True) -> int:
    """Markdown (and the sweep chart) again from saved compare JSON files."""
    import json

    for path in paths:
        report = json.loads(Path(path).read_text("utf-8"))
        markdown = format_markdown(report)
        Path(path).with_suffix(".md").write_text(markdown + "\n", "utf-8")
        print(markdown + "\n")
        if chart and len(report["sweep"]) > 1:
            from server.bench.plot import plot_sweep

            plot_sweep(report, Path(path).with_suffix(".png"))
    return 0


def _strip_requests(report: dict[str, Any]) -> dict[str, Any]:
    """The JSON keeps per-request rows only for the first round, to stay small."""
    out = dict(report)
    out["results"] = {
        s: [dict(sweep, runs=[run if i == 0 else {k: v for k, v in run.items() if k != "requests"} for run in sweep["runs"]])
            for i, sweep in enumerate(sweeps)]
        for s, sweeps in report["results"].items()
    }
    return out


def _point_label(run: dict[str, Any]) -> str:
    if run.get("max_concurrency"):
        return f"conc {run['max_concurrency']}"
    return f"rate {run['request_rate']}"


def _median(values: list[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def point_figures(report: dict[str, Any], server: str, index: int) -> dict[str, Any]:
    """Median over rounds of one sweep point's headline figures."""
    runs = [sweep["runs"][index] for sweep in report["results"].get(server, [])]
    if not runs:
        return {}

    def med(fn) -> float | None:
        return _median([fn(r) for r in runs])

    return {
        "output_throughput": med(lambda r: r["output_throughput"]),
        "request_throughput": med(lambda r: r["request_throughput"]),
        "ttft_p50": med(lambda r: r["ttft_ms"]["p50"]),
        "ttft_p99": med(lambda r: r["ttft_ms"]["p99"]),
        "tpot_p50": med(lambda r: r["tpot_ms"]["p50"]),
        "itl_p50": med(lambda r: r["itl_ms"]["p50"]),
        "itl_p99": med(lambda r: r["itl_ms"]["p99"]),
        "e2el_p50": med(lambda r: r["e2el_ms"]["p50"]),
        "goodput": med(lambda r: r["goodput"]["request_goodput"] if "goodput" in r else None),
        "prefix_hit": med(lambda r: (r.get("server_metrics") or {}).get("prefix_cache_hit_rate")),
        "cpu_s": med(lambda r: (r.get("server_process") or {}).get("cpu_seconds")),
        "tok_per_cpu_s": med(lambda r: r["total_output_tokens"] / r["server_process"]["cpu_seconds"]
                             if (r.get("server_process") or {}).get("cpu_seconds") else None),
        "rss_mib": med(lambda r: (r.get("server_process") or {}).get("peak_rss_mib")),
        "failed": sum(r["failed"] for r in runs),
        "load": [round(r["loadavg_start"][0], 1) for r in runs if r.get("loadavg_start")],
        "label": _point_label(runs[0]),
    }


ROWS = (
    ("output_throughput", "output tok/s", 1),
    ("request_throughput", "req/s", 2),
    ("ttft_p50", "TTFT p50 (ms)", 0),
    ("ttft_p99", "TTFT p99 (ms)", 0),
    ("tpot_p50", "TPOT p50 (ms)", 1),
    ("itl_p50", "ITL p50 (ms)", 1),
    ("itl_p99", "ITL p99 (ms)", 1),
    ("e2el_p50", "E2E p50 (ms)", 0),
    ("goodput", "goodput (req/s)", 2),
    ("prefix_hit", "prefix cache hit rate", 2),
    ("cpu_s", "server CPU s", 1),
    ("tok_per_cpu_s", "output tok per server CPU s", 1),
    ("rss_mib", "server peak RSS (MiB)", 0),
)


def format_markdown(report: dict[str, Any]) -> str:
    servers = list(report["results"])
    s = report["settings"]
    lines = [
        (f"**{report['name']}** — {report['workload']}, endpoint {s['endpoint']}, dtype {s['dtype']} "
         f"(vLLM {s.get('peer_dtype', s['dtype'])}), compute threads {s['threads']}, max-model-len {s['max_model_len']}, KV {s['kv_cache_gib']:g} GiB, "
         f"max-num-seqs {s['max_num_seqs']}, {s['rounds']} round(s) (median shown), {report['date']}, "
         f"pagedserve at {report.get('pagedserve_revision') or 'unknown revision'}"),
        "",
    ]
    both = "pagedserve" in servers and "vllm" in servers
    header = "| load point | metric | " + " | ".join(servers) + (" | ours / vLLM |" if both else " |")
    lines += [header, "| --- | --- |" + " ---: |" * (len(servers) + (1 if both else 0))]
    for i in range(len(report["sweep"])):
        figs = {srv: point_figures(report, srv, i) for srv in servers}
        label = next((f["label"] for f in figs.values() if f), "")
        for key, title, digits in ROWS:
            values = [figs[srv].get(key) for srv in servers]
            if all(v is None for v in values):
                continue
            cells = [("-" if v is None else f"{v:.{digits}f}") for v in values]
            ratio = ""
            if both:
                a, b = figs["pagedserve"].get(key), figs["vllm"].get(key)
                # a latency of ~0 (tokens that arrive in one burst) makes no meaningful ratio
                ratio = f" | {a / b:.2f}" if a is not None and b is not None and abs(b) >= 0.05 else " | -"
            lines.append(f"| {label} | {title} | " + " | ".join(cells) + ratio + " |")
        lines.append(f"| {label} | load avg at start | " + " | ".join(
            ",".join(map(str, figs[srv].get("load", []))) or "-" for srv in servers) + (" | |" if both else " |"))
        fails = [figs[srv].get("failed", 0) for srv in servers]
        if any(fails):
            lines.append(f"| {label} | failed requests | " + " | ".join(map(str, fails)) + (" | |" if both else " |"))
    lines.append("")
    lines.append("Ratios are ours / vLLM: above 1 is better for throughput and goodput, worse for latencies.")
    return "\n".join(lines)
