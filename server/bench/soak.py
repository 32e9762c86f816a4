"""`pagedserve bench soak`: a steady mixed load for N minutes; does the server stay flat?

Workers at a bounded concurrency send a mix of completions and chat, streaming and not, n > 1,
stop strings, streams the client cuts mid-way and bad requests (a 4xx is their expected answer).
Every interval the server's /metrics gives its resident memory (prometheus_client's
`process_resident_memory_bytes`) and KV cache usage, so the server may be remote. After the load
the server is left idle until it holds no request, and the summary compares its memory with the
value after warm-up, fits the slope of the last minutes and lists every answer by status.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from server.bench.client import ENDPOINTS, build_payload, send_request
from server.bench.datasets import BenchRequest
from server.bench.stats import distribution, load_average
from server.bench.target import fetch_model_name

# (kind, weight): the workers take turns through a cycle with each kind `weight` times, interleaved,
# so that any 8 consecutive requests hold every kind.
MIX = (("completion", 3), ("completion-stream", 3), ("chat", 2), ("chat-stream", 2), ("n2", 1),
       ("stop", 1), ("cut-stream", 2), ("bad-request", 1))
WORDS = "the a cat dog sat on mat under bright sky river stone light over near far quick slow".split()


def mix_cycle() -> list[str]:
    """MIX round-robin: every kind once, then again those with weight left, ..."""
    rounds = max(weight for _, weight in MIX)
    return [kind for r in range(rounds) for kind, weight in MIX if weight > r]


@dataclass
class SoakConfig:
    base_url: str
    duration_s: float
    interval_s: float = 30.0
    warmup_s: float = 60.0
    concurrency: int = 8
    max_tokens: int = 32
    idle_timeout_s: float = 60.0
    seed: int = 0
    api_key: str | None = None
    model: str | None = None


@dataclass
class Outcome:
    kind: str
    status: str  # the HTTP status, "cut" (the client closed the stream on purpose) or an error class
    latency: float | None  # seconds, for a request that ran to its end
    done_at: float  # seconds since the load started


@dataclass
class Sample:
    t: float
    rss_mb: float | None
    kv_usage: float | None
    running: float | None
    failures: dict[str, float] = field(default_factory=dict)  # request_failures_total by reason


def read_sample(text: str, t: float) -> Sample:
    """RSS, KV usage, running requests and failure counters from Prometheus text (ours or vLLM's names)."""
    values: dict[str, float] = {}
    failures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.split(":", 1)[-1]
            if name == "request_failures_total":
                failures[s.labels.get("reason", "")] = failures.get(s.labels.get("reason", ""), 0.0) + s.value
            elif name in ("process_resident_memory_bytes", "kv_cache_usage_perc", "num_requests_running"):
                values[name] = values.get(name, 0.0) + s.value
    rss = values.get("process_resident_memory_bytes")
    return Sample(t, None if rss is None else rss / 1e6, values.get("kv_cache_usage_perc"),
                  values.get("num_requests_running"), failures)


class Soak:
    def __init__(self, config: SoakConfig, model: str):
        self.config, self.model = config, model
        self.rng = random.Random(f"soak:{config.seed}")
        self.cycle = itertools.cycle(mix_cycle())
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.t0 = 0.0

    def _prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(8, 64)))

    async def _one(self, client: httpx.AsyncClient, kind: str) -> Outcome:
        c, start = self.config, time.perf_counter()
        prompt, tokens = self._prompt(), self.rng.randint(4, c.max_tokens)
        endpoint = "chat" if kind.startswith("chat") else "completions"
        request = BenchRequest([], prompt, 0, tokens, [{"role": "user", "content": prompt}])
        payload = build_payload(request, endpoint, self.model, prompt_format="text", temperature=0.8,
                                ignore_eos=False, extra={"seed": self.rng.randint(0, 1 << 30)})
        if kind.endswith("-stream") and kind != "cut-stream":
            result = await send_request(client, c.base_url, endpoint, payload, request, self.t0)
            status = "transport" if result.status is None else str(result.status)
            return self._done(kind, "stream-error" if status == "200" and not result.success else status,
                              start, result.success)
        if kind == "cut-stream":
            return await self._cut(client, payload, start)
        payload.pop("stream_options")
        payload["stream"] = False
        if kind == "n2":
            payload["n"] = 2
        elif kind == "stop":
            payload["stop"] = [" the", " sky"]
        elif kind == "bad-request":
            payload.update(self.rng.choice(({"max_tokens": -1}, {"model": "no-such-model"}, {"temperature": -2},
                                            {"n": 0}, {"top_p": 1.5}, {"prompt": [10**9]}, {"prompt": "x " * 20_000})))
        try:
            response = await client.post(c.base_url.rstrip("/") + ENDPOINTS[endpoint], json=payload)
        except httpx.HTTPError as exc:
            return self._done(kind, type(exc).__name__, start, False)
        if response.status_code != 200:
            return self._done(kind, str(response.status_code), start, False)
        try:
            choices = response.json().get("choices") or []
        except ValueError:
            return self._done(kind, "bad-body", start, False)
        return self._done(kind, "200" if len(choices) == payload.get("n", 1) else "bad-body", start, True)

    async def _cut(self, client: httpx.AsyncClient, payload: dict[str, Any], start: float) -> Outcome:
        """Stream, read a few events, then close the connection mid-stream."""
        payload = dict(payload, max_tokens=max(64, payload.get("max_tokens", 0) * 4), ignore_eos=True)
        keep = self.rng.randint(1, 4)
        try:
            async with client.stream("POST", self.config.base_url.rstrip("/") + ENDPOINTS["completions"],
                                     json=payload) as response:
                if response.status_code != 200:
                    return self._done("cut-stream", str(response.status_code), start, False)
                async for line in response.aiter_lines():
                    keep -= line.startswith("data:")
                    if keep <= 0:
                        break
        except httpx.HTTPError as exc:
            return self._done("cut-stream", type(exc).__name__, start, False)
        return self._done("cut-stream", "cut", start, False)

    def _done(self, kind: str, status: str, start: float, timed: bool) -> Outcome:
        now = time.perf_counter()
        outcome = Outcome(kind, status, now - start if timed else None, now - self.t0)
        self.outcomes.append(outcome)
        return outcome

    async def _worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            await self._one(client, next(self.cycle))

    async def _sample(self, client: httpx.AsyncClient) -> Sample | None:
        try:
            response = await client.get(self.config.base_url.rstrip("/") + "/metrics", timeout=30)
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        sample = read_sample(response.text, time.perf_counter() - self.t0)
        self.samples.append(sample)
        return sample

    async def run(self, on_row=None) -> dict[str, Any]:
        c = self.config
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        limits = httpx.Limits(max_connections=c.concurrency + 4)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(300, connect=30)) as client:
            load_start = load_average()
            self.t0 = time.perf_counter()
            await self._sample(client)
            deadline = self.t0 + c.duration_s
            workers = [asyncio.create_task(self._worker(client, deadline)) for _ in range(c.concurrency)]
            rows, last = [], 0.0
            while last < c.duration_s:
                last = min(last + c.interval_s, c.duration_s)
                await asyncio.sleep(max(0.0, self.t0 + last - time.perf_counter()))
                sample = await self._sample(client)
                rows.append(self._row(rows[-1]["t"] if rows else 0.0, last, sample))
                if on_row:
                    on_row(rows[-1])
            await asyncio.gather(*workers)
            load_s = time.perf_counter() - self.t0
            idle = await self._wait_idle(client)
        return self._summary(rows, idle, load_s, load_start)

    async def _wait_idle(self, client: httpx.AsyncClient) -> Sample | None:
        """Poll until the server holds no running request and no KV block (or the idle timeout)."""
        end = time.perf_counter() + self.config.idle_timeout_s
        sample = await self._sample(client)
        while sample and (sample.kv_usage or sample.running) and time.perf_counter() < end:
            await asyncio.sleep(1.0)
            sample = await self._sample(client)
        return sample

    def _row(self, t_from: float, t_to: float, sample: Sample | None) -> dict[str, Any]:
        window = [o for o in self.outcomes if t_from < o.done_at <= t_to]
        latency = distribution([o.latency for o in window if o.latency is not None])
        return {"t": t_to, "done": sum(1 for o in self.outcomes if o.done_at <= t_to), "in_interval": len(window),
                "rss_mb": sample and sample.rss_mb, "kv_usage": sample and sample.kv_usage,
                "p50_ms": latency["p50"], "p99_ms": latency["p99"],
                "by_status": dict(sorted(Counter(o.status for o in window).items()))}

    def _summary(self, rows: list[dict[str, Any]], idle: Sample | None, load_s: float, load_start: list[float]) -> dict[str, Any]:
        c = self.config
        rss = [(s.t, s.rss_mb) for s in self.samples if s.rss_mb is not None and s.t <= load_s]
        warm = next((v for t, v in rss if t >= min(c.warmup_s, c.duration_s / 2)), None)
        end = idle.rss_mb if idle else None
        tail = [(t, v) for t, v in rss if t >= max(load_s / 2, load_s - 300)]
        slope = float(np.polyfit([t for t, _ in tail], [v for _, v in tail], 1)[0] * 60) if len(tail) >= 3 else None
        by_status = Counter(o.status for o in self.outcomes)
        by_kind: dict[str, Counter] = {}
        for o in self.outcomes:
            by_kind.setdefault(o.kind, Counter())[o.status] += 1
        first = self.samples[0].failures if self.samples else {}
        failures = {k: v - first.get(k, 0.0) for k, v in (idle.failures if idle else {}).items()}
        server_errors = sum(n for s, n in by_status.items() if s.startswith("5"))
        unexpected = sum(1 for o in self.outcomes if not _expected(o))
        return {
            "base_url": c.base_url, "model": self.model, "duration_s": c.duration_s, "load_s": load_s,
            "concurrency": c.concurrency, "interval_s": c.interval_s, "warmup_s": c.warmup_s, "seed": c.seed,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": load_start, "loadavg_end": load_average(),
            "requests": len(self.outcomes), "by_status": dict(sorted(by_status.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
            "latency_ms": distribution([o.latency for o in self.outcomes if o.latency is not None]),
            "server_errors_5xx": server_errors, "unexpected": unexpected,
            "server_failures_by_reason": {k: v for k, v in sorted(failures.items()) if v},
            "rss_after_warmup_mb": warm, "rss_end_mb": end,
            "rss_drift_pct": None if warm is None or end is None else 100.0 * (end - warm) / warm,
            "rss_slope_mb_per_min": slope, "rss_slope_window_s": [tail[0][0], tail[-1][0]] if tail else None,
            "kv_usage_end": idle.kv_usage if idle else None, "running_end": idle.running if idle else None,
            "intervals": rows,
        }


def _expected(o: Outcome) -> bool:
    """A bad request answered 4xx, a cut stream cut, anything else answered 200."""
    if o.kind == "bad-request":
        return o.status.startswith("4")
    return o.status == ("cut" if o.kind == "cut-stream" else "200")


async def run_soak(config: SoakConfig, on_row=None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        served, _root = await fetch_model_name(client, config.base_url, headers)
    return await Soak(config, config.model or served).run(on_row)


def soak_ok(s: dict[str, Any], max_drift_pct: float | None) -> bool:
    drift_ok = max_drift_pct is None or (s["rss_drift_pct"] is not None and abs(s["rss_drift_pct"]) <= max_drift_pct)
    return drift_ok and not s["server_errors_5xx"] and not s["unexpected"] and s["kv_usage_end"] == 0


# ---- output -------------------------------------------------------------------------------

def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_header() -> str:
    return f"{'time s':>7} {'done':>7} {'RSS MB':>8} {'KV %':>6} {'p50 ms':>8} {'p99 ms':>8}  by status"


def format_row(r: dict[str, Any]) -> str:
    kv = None if r["kv_usage"] is None else 100 * r["kv_usage"]
    statuses = " ".join(f"{k}:{v}" for k, v in r["by_status"].items())
    return (f"{r['t']:>7.0f} {r['done']:>7} {_f(r['rss_mb'], '8.1f')} {_f(kv, '6.1f')} "
            f"{_f(r['p50_ms'], '8.0f')} {_f(r['p99_ms'], '8.0f')}  {statuses}")


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"requests: {s['requests']} in {s['load_s']:.0f} s at concurrency {s['concurrency']}",
        f"by status: {' '.join(f'{k}:{v}' for k, v in s['by_status'].items())}",
        f"5xx: {s['server_errors_5xx']}   unexpected answers: {s['unexpected']} (a bad request not 4xx, another not 200)",
        f"server failures by reason: {s['server_failures_by_reason'] or '-'}",
        f"latency p50 / p99 (ms): {_f(s['latency_ms']['p50'], '.0f')} / {_f(s['latency_ms']['p99'], '.0f')}",
        f"RSS after warm-up / at end (MB): {_f(s['rss_after_warmup_mb'], '.1f')} / {_f(s['rss_end_mb'], '.1f')}"
        f"   drift {_f(s['rss_drift_pct'], '+.2f')} %",
        f"RSS slope over the last {_window(s)}: {_f(s['rss_slope_mb_per_min'], '+.2f')} MB/min",
        f"KV usage at the end, idle: {_f(s['kv_usage_end'], '.3f')}   running: {_f(s['running_end'], '.0f')}",
        f"load average start / end: {_load(s['loadavg_start'])} / {_load(s['loadavg_end'])}",
    ]
    return "\n".join(lines)


def _window(s: dict[str, Any]) -> str:
    w = s["rss_slope_window_s"]
    return "-" if not w else f"{w[1] - w[0]:.0f} s"


def _load(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "-"
