"""/metrics on a real server, parsed back with prometheus_client's own text parser."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from api_server import disconnect_mid_request
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

P = "pagedserve:"


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and want.items() <= dict(ls).items())


def wait_gauges_idle(server, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        gauges = [value(samples, P + g) for g in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if gauges == [0, 0, 0] or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_counters_move_by_exactly_what_usage_reports(api_server):
    before = wait_gauges_idle(api_server)
    prompt_tokens = completion_tokens = 0
    requests = [("Once upon a time", 7), ("The weather today", 5), ("A list of numbers: 1, 2, 3", 9)]
    for prompt, max_tokens in requests:
        body = {"model": api_server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{api_server.base_url}/v1/completions", json=body, headers=api_server.headers, timeout=60)
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
        completion_tokens += r.json()["usage"]["completion_tokens"]
    after = wait_gauges_idle(api_server)

    def delta(name, **labels):
        return value(after, P + name, **labels) - value(before, P + name, **labels)

    assert delta("prompt_tokens_total") == prompt_tokens
    assert delta("generation_tokens_total") == completion_tokens
    assert delta("request_success_total", finished_reason="length") == len(requests)
    assert delta("e2e_request_latency_seconds_count") == len(requests)
    assert delta("time_to_first_token_seconds_count") == len(requests)
    assert delta("inter_token_latency_seconds_count") == completion_tokens - len(requests)
    assert delta("request_generation_tokens_sum") == completion_tokens
    assert delta("request_prompt_tokens_sum") == prompt_tokens
    assert delta("iteration_tokens_total_sum") >= completion_tokens
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(after, P + gauge, model_name=api_server.model_name) == 0, gauge


def test_refused_requests_are_counted_by_cause(api_server):
    before = scrape(api_server)
    url = f"{api_server.base_url}/v1/completions"
    assert httpx.post(url, json={"prompt": "x", "max_tokens": -1}, headers=api_server.headers).status_code == 400
    assert httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    after = scrape(api_server)
    for reason in ("validation", "unauthorized"):
        name = P + "request_failures_total"
        assert value(after, name, reason=reason) - value(before, name, reason=reason) == 1, reason


def test_startup_and_cache_config_are_exported(api_server):
    samples = scrape(api_server)
    assert value(samples, P + "startup_phase_seconds", phase="load_weights") > 0
    info = [dict(labels) for (name, labels), v in samples.items() if name == P + "cache_config_info" and v == 1]
    assert info and info[0]["block_size"] == "16" and int(info[0]["num_gpu_blocks"]) > 0
    assert info[0]["enable_prefix_caching"] == "True"


def label_values(samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (n, labels) in samples if n == name}


def test_only_start_up_phases_that_ran_are_exported(api_server):
    """No compile or warm-up step runs: no series for them, rather than a 0 that reads as "instant"."""
    phases = label_values(scrape(api_server), P + "startup_phase_seconds", "phase")
    assert phases == {"download", "load_weights", "kv_cache"}


def test_a_phase_is_exported_once_the_engine_reports_it():
    metrics = Metrics("m", 512)
    metrics.set_startup({"load_weights": 1.5, "compile": 7.0}, block_size=16, num_blocks=8, cache_dtype="float32", prefix_caching=True)
    samples = {(s.name, s.labels.get("phase")): s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[(P + "startup_phase_seconds", "compile")] == 7.0
    assert (P + "startup_phase_seconds", "warmup") not in samples


def test_every_failure_reason_has_a_source(api_server):
    """An engine-side abort is counted by its cause (disconnected, draining, engine_error), never as "aborted"."""
    reasons = label_values(scrape(api_server), P + "request_failures_total", "reason")
    assert reasons == {"validation", "unauthorized", "overloaded", "disconnected", "engine_error", "draining"}


def test_an_aborted_request_is_counted_as_finished_by_abort(api_server):
    """As vLLM does: request_success_total{finished_reason="abort"}, with its latency and sizes observed;
    the cause (the client went away) is counted once in request_failures_total."""
    before = wait_gauges_idle(api_server)
    body = {"prompt": "Go on and on", "max_tokens": 480, "min_tokens": 480, "temperature": 0, "stream": True}
    disconnect_mid_request(api_server, "/v1/completions", body, streaming=True)

    def delta(samples, name, **labels):
        return value(samples, P + name, **labels) - value(before, P + name, **labels)

    deadline = time.monotonic() + 5
    while delta(after := scrape(api_server), "request_success_total", finished_reason="abort") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert delta(after, "request_success_total", finished_reason="abort") == 1
    assert delta(after, "request_success_total") == 1
    assert delta(after, "e2e_request_latency_seconds_count") == 1
    assert delta(after, "request_generation_tokens_count") == 1 and delta(after, "request_generation_tokens_sum") >= 1
    assert delta(after, "request_failures_total", reason="disconnected") == 1
    assert delta(after, "request_failures_total") == 1
    assert delta(after, "http_requests_client_disconnected_total") == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt package prometheus)")
def test_exposition_passes_promtool(api_server):
    """promtool parses the exposition and finds no lint problem, except the two that vLLM-compatible
    names bring by design: the `pagedserve:` prefix (promtool reserves ':' for recording rules) and
    the histogram `iteration_tokens_total` (vLLM's name, which ends in `_total`)."""
    text = httpx.get(f"{api_server.base_url}/metrics", timeout=10).text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 1 would be a parse error
    problems = [line for line in (check.stdout + check.stderr).splitlines() if line.strip()]
    by_design = ("metric names should not contain ':'", 'iteration_tokens_total non-counter metrics should not have "_total" suffix')
    other = [line for line in problems if not line.endswith(by_design)]
    assert not other, other
