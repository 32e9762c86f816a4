"""`pagedserve bench serve`: load a running OpenAI-compatible server and report what it did.

Works against any server speaking the OpenAI API (ours, vLLM, ...). Requests arrive all at once
(`--request-rate inf`) or as a Poisson process, optionally capped at `--max-concurrency` in
flight; `--concurrency 1,8,32` or `--request-rate 2,4` sweeps one of them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from server.bench.client import RequestResult, build_payload, send_request
from server.bench.datasets import BenchRequest, WorkloadSpec, build_workload
from server.bench.stats import (
    ProcessMonitor,
    load_average,
    metrics_delta,
    parse_prometheus,
    summarize,
)
from server.bench.target import BenchError, fetch_model_name, resolve_tokenizer


@dataclass
class RunConfig:
    base_url: str
    model: str | None = None  # None: the first of GET /v1/models
    endpoint: str = "completions"
    request_rate: float = math.inf
    max_concurrency: int | None = None
    burstiness: float = 1.0
    prompt_format: str = "ids"  # completions: send token ids (exact counts) or the prompt text
    temperature: float = 0.0
    ignore_eos: bool = True
    goodput: dict[str, float] = field(default_factory=dict)  # seconds
    pid: int | None = None
    api_key: str | None = None
    num_warmups: int = 1
    seed: int = 0
    disable_tqdm: bool = False
    timeout_s: float = 3600.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request (response_format...)


def parse_rate(value: str) -> float:
    return math.inf if value.strip().lower() in ("inf", "infinity", "") else float(value)


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for rate inf, else gamma(burstiness) gaps with mean 1/rate
    (burstiness 1: a Poisson process)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


async def scrape_metrics(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    try:
        response = await client.get(base_url.rstrip("/") + "/metrics", timeout=30)
        if response.status_code != 200:
            return None
        return parse_prometheus(response.text)
    except httpx.HTTPError:
        return None


async def run_once(config: RunConfig, requests: list[BenchRequest], model: str,
                   warmup: list[BenchRequest] | None = None) -> dict[str, Any]:
    """Send `requests` as configured; the figures of the run as a dict."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        for w in warmup or []:
            payload = build_payload(w, config.endpoint, model, prompt_format=config.prompt_format,
                                    temperature=config.temperature, ignore_eos=config.ignore_eos, extra=config.extra_body)
            result = await send_request(client, config.base_url, config.endpoint, payload, w, time.perf_counter())
            if not result.success:
                raise BenchError(f"warm-up request failed: {result.error}")

        before = await scrape_metrics(client, config.base_url)
        monitor = ProcessMonitor(config.pid).start() if config.pid else None
        load_start = load_average()
        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        bar = tqdm(total=len(requests), desc=_bar_label(config), unit="req", disable=config.disable_tqdm)
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            payload = build_payload(req, config.endpoint, model, prompt_format=config.prompt_format,
                                    temperature=config.temperature, ignore_eos=config.ignore_eos, extra=config.extra_body)
            if semaphore is None:
                result = await send_request(client, config.base_url, config.endpoint, payload, req, t0)
            else:
                async with semaphore:
                    result = await send_request(client, config.base_url, config.endpoint, payload, req, t0)
            bar.update(1)
            return result

        # Arrivals follow absolute times (t0 + the sum of the gaps so far), so a busy event loop
        # delays a request but never shifts the whole schedule; the worst lag is reported.
        tasks, due, lag = [], 0.0, 0.0
        for gap, req in zip(arrival_gaps(len(requests), config.request_rate, config.burstiness, config.seed), requests):
            due += gap
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, time.perf_counter() - t0 - due)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
        load_end = load_average()
        process = monitor.stop(duration) if monitor else None
        after = await scrape_metrics(client, config.base_url)

    summary = summarize(results, duration, config.goodput)
    summary.update({
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "max_concurrency": config.max_concurrency,
        "num_prompts": len(requests),
        "max_arrival_lag_s": lag,
        "server_metrics": metrics_delta(before, after),
        "server_process": process,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "requests": [_request_row(r) for r in results],
    })
    return summary


def _bar_label(config: RunConfig) -> str:
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    return f"rate {rate}" + (f", conc {config.max_concurrency}" if config.max_concurrency else "")


def _request_row(r: RequestResult) -> dict[str, Any]:
    row = asdict(r)
    row["tpot"] = r.tpot
    row.pop("itl")
    row["itl_count"] = len(r.itl)
    return row


def sweep_points(concurrency: list[int] | None, rates: list[float]) -> list[tuple[float, int | None]]:
    """(request rate, max concurrency) of each run."""
    if concurrency and len(rates) > 1:
        raise BenchError("sweep either --concurrency or --request-rate, not both")
    if concurrency:
        return [(rates[0], c) for c in concurrency]
    return [(r, None) for r in rates]


async def run_sweep(config: RunConfig, spec: WorkloadSpec, points: list[tuple[float, int | None]],
                    tokenizer_dir: str | None = None, num_prompts: list[int] | None = None,
                    max_model_len: int | None = None) -> dict[str, Any]:
    """Every sweep point against one server; the workload is rebuilt per point (seed + index) so that
    no point hits the prefix cache with an earlier point's prompts."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        served, root = await fetch_model_name(client, config.base_url, headers)
    model = config.model or served
    tokenizer = resolve_tokenizer(tokenizer_dir, model, root)
    runs = []
    for i, (rate, conc) in enumerate(points):
        n = num_prompts[i] if num_prompts and len(num_prompts) > 1 else (num_prompts[0] if num_prompts else spec.num_prompts)
        point_spec = replace(spec, num_prompts=n, seed=spec.seed + i, endpoint=config.endpoint)
        requests = build_workload(point_spec, tokenizer, max_model_len)
        warm_spec = replace(point_spec, dataset="random", num_prompts=config.num_warmups,
                            input_len=16, output_len=4, seed=10_000 + spec.seed + i)
        warmup = build_workload(warm_spec, tokenizer) if config.num_warmups else None
        run_config = replace(config, request_rate=rate, max_concurrency=conc, seed=config.seed + i)
        summary = await run_once(run_config, requests, model, warmup)
        summary["workload"] = point_spec.describe()
        runs.append(summary)
        if not config.disable_tqdm:
            print(format_table(summary, title=f"{config.base_url} {_bar_label(run_config)}"))
    return {
        "base_url": config.base_url,
        "model": model,
        "endpoint": config.endpoint,
        "workload": {k: v for k, v in asdict(spec).items() if k != "extra"},
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ---- output -------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(s: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    width = 56
    lines = ["{s:{c}^{n}}".format(s=f" {title} ", n=width, c="=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<40}{_fmt(value, digits):>16}")

    def section(name: str) -> None:
        lines.append("{s:{c}^{n}}".format(s=f" {name} ", n=width, c="-"))

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Request rate (req/s):", s["request_rate"])
    row("Max concurrency:", s["max_concurrency"])
    row("Peak concurrent requests:", s["peak_concurrency"])
    row("Benchmark duration (s):", s["duration_s"])
    if s.get("max_arrival_lag_s") is not None and s["request_rate"] != "inf":
        row("Max arrival lag behind schedule (s):", s["max_arrival_lag_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    if "goodput" in s:
        row("Request goodput (req/s):", s["goodput"]["request_goodput"])
        row("Requests within SLOs (%):", 100.0 * s["goodput"]["good_fraction"])
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                      ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        section(name)
        short = key.split("_")[0].upper()
        for stat in ("mean", "p50", "p90", "p99"):
            row(f"{stat.capitalize() if stat == 'mean' else stat.upper()} {short} (ms):", s[key][stat])
    section("Checks and server")
    row("Prompt-token count mismatches:", s["input_len_mismatches"])
    row("Output-token count mismatches:", s["output_len_mismatches"])
    m = s.get("server_metrics") or {}
    if m.get("available"):
        rate = m.get("prefix_cache_hit_rate")
        row("Prefix cache hit rate (%):", None if rate is None else 100.0 * rate)
        row("Preemptions:", m.get("preemptions"))
    p = s.get("server_process")
    if p:
        row("Server CPU seconds:", p["cpu_seconds"])
        row("Server CPU utilisation (cores):", p["cpu_utilization"])
        row("Server peak RSS, summed (MiB):", p["peak_rss_mib"], 0)
    row("Load average at start / end:", f"{_load(s['loadavg_start'])} / {_load(s['loadavg_end'])}")
    if s["errors"]:
        section("Errors")
        for err, count in s["errors"].items():
            lines.append(f"{count:>5} x {err}")
    lines.append("=" * width)
    return "\n".join(lines)


def _load(values: list[float]) -> str:
    return ",".join(f"{v:.1f}" for v in values[:1]) if values else "-"


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", "utf-8")
