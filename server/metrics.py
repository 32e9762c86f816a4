"""Every Prometheus metric, declared once. Names, types and label sets map one-to-one onto vLLM's
(`pagedserve:X` for `vllm:X`), so dashboards and autoscaler queries port by a rename.

The engine feeds `observe_step` with per-step stats; the API counts refused and failed requests with
`count_failure`. Each server owns its registry: nothing here is module-level mutable state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

PREFIX = "pagedserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets reach down to GPU decode steps (ms) and up to slow CPU runs (minutes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Why a request was refused or did not finish. An engine-side abort has no reason of its own: its cause
# (the client went away, the server drained, the engine failed) is what gets counted, once.
FAILURE_REASONS = ("validation", "unauthorized", "overloaded", "disconnected", "engine_error", "draining")


@dataclass
class FinishedStats:
    """Timings and sizes of one finished choice, observed once by the metrics."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_seconds: float
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float


@dataclass
class StepStats:
    """What one step did, for metrics and logs."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_batched_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of the requests whose first token came this step
    num_generated_tokens: int = 0
    num_preempted: int = 0
    step_seconds: float = 0.0
    prefix_queries: int = 0  # cumulative, in tokens
    prefix_hits: int = 0
    ttfts: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedStats] = field(default_factory=list)


def token_buckets(max_model_len: int) -> list[int]:
    """1-2-5 buckets up to max_model_len, as vLLM builds them."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class Metrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry

        def gauge(name, doc, extra=()):
            return Gauge(PREFIX + name, doc, labels + list(extra), registry=reg)

        def counter(name, doc, extra=()):
            return Counter(PREFIX + name, doc, labels + list(extra), registry=reg)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg)

        self.num_requests_running = gauge("num_requests_running", "Requests in model execution batches.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self.request_success = counter("request_success", "Successfully finished requests.", ["finished_reason"])
        self.request_failures = counter("request_failures", "Requests refused or failed, by cause.", ["reason"])
        self.client_disconnects = counter("http_requests_client_disconnected", "Requests whose client went away.")
        self.num_preemptions = counter("num_preemptions", "Cumulative preemptions from the engine.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prefix cache queries, in tokens.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prefix cache hits, in tokens.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency in seconds.", REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time in the WAITING phase.", REQUEST_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "Time in the PREFILL phase.", REQUEST_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Time in the DECODE phase.", REQUEST_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generation tokens per request.", tokens)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens per engine step.", ITERATION_BUCKETS)
        self.startup_seconds = gauge("startup_phase_seconds", "Seconds spent in each start-up phase.", ["phase"])
        self.cache_config_info = gauge(
            "cache_config_info", "Information of the KV cache config.",
            ["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
        )
        self._last_prefix_queries = 0
        self._last_prefix_hits = 0
        self._last_preemptions_total = 0
        for gauge_metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc):
            gauge_metric.labels(model_name).set(0)
        for reason in FAILURE_REASONS:
            self.request_failures.labels(model_name, reason)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)

    def set_startup(self, phases: dict[str, float], block_size: int, num_blocks: int, cache_dtype: str, prefix_caching: bool) -> None:
        """`phases`: seconds of each start-up phase that ran (download, load_weights, kv_cache, and compile or
        warmup once the engine has such steps); a phase that did not run has no series rather than a 0."""
        for phase, seconds in phases.items():
            self.startup_seconds.labels(self.model_name, phase).set(seconds)
        self.cache_config_info.labels(self.model_name, str(block_size), str(num_blocks), cache_dtype, str(prefix_caching)).set(1)

    def observe_step(self, stats: StepStats) -> None:
        name = self.model_name
        self.num_requests_running.labels(name).set(stats.num_running)
        self.num_requests_waiting.labels(name).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(name).set(stats.kv_usage)
        if stats.num_batched_tokens:
            self.iteration_tokens.labels(name).observe(stats.num_batched_tokens)
        self.prompt_tokens.labels(name).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.num_generated_tokens)
        self.num_preemptions.labels(name).inc(stats.num_preempted)
        self.prefix_cache_queries.labels(name).inc(max(0, stats.prefix_queries - self._last_prefix_queries))
        self.prefix_cache_hits.labels(name).inc(max(0, stats.prefix_hits - self._last_prefix_hits))
        self._last_prefix_queries, self._last_prefix_hits = stats.prefix_queries, stats.prefix_hits
        for value in stats.ttfts:
            self.ttft.labels(name).observe(value)
        for value in stats.inter_token_latencies:
            self.itl.labels(name).observe(value)
        for done in stats.finished:
            self.request_success.labels(name, done.finish_reason).inc()
            self.e2e.labels(name).observe(done.e2e_seconds)
            self.queue_time.labels(name).observe(done.queue_seconds)
            self.prefill_time.labels(name).observe(done.prefill_seconds)
            self.decode_time.labels(name).observe(done.decode_seconds)
            self.request_prompt_tokens.labels(name).observe(done.num_prompt_tokens)
            self.request_generation_tokens.labels(name).observe(done.num_generation_tokens)

    def count_failure(self, reason: str) -> None:
        self.request_failures.labels(self.model_name, reason).inc()
        if reason == "disconnected":
            self.client_disconnects.labels(self.model_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
