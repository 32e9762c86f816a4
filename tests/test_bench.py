"""The benchmark client (`pagedserve bench serve`, `bench soak`) against our server on the built-in demo
model, plus its pure parts.

Fast and never about speed: exact token counts, TTFT <= E2E, the JSON, determinism of workloads, the
tokenizer found without --tokenizer, one-line errors.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from server.bench.datasets import (
    PromptBuilder,
    WorkloadSpec,
    build_workload,
    sharegpt_lengths,
)
from server.bench.serve import arrival_gaps
from server.bench.soak import MIX, read_sample
from server.bench.stats import metrics_delta, parse_goodput, parse_prometheus
from server.bench.target import BenchError, resolve_tokenizer
from server.cli import main as cli_main
from api_server import serve_in_subprocess
from server.demo import ensure_demo_model


@pytest.fixture(scope="module")
def demo_dir() -> str:
    return str(ensure_demo_model())


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def served(demo_dir):
    """`pagedserve serve DEMO_DIR` (the random demo model: fast and deterministic) in its own process; yields
    (base_url, pid). The benchmarks find its tokenizer from /v1/models alone."""
    flags = ("--max-model-len", "512", "--kv-cache-memory", "0.125", "--max-num-seqs", "16", "--disable-access-log")
    with serve_in_subprocess(demo_dir, *flags) as running:
        yield running


def _bench(served, tmp_path, *extra: str) -> dict:
    url, pid = served
    out = tmp_path / "result.json"
    code = cli_main(["bench", "serve", "--base-url", url, "--pid", str(pid), "--result-json", str(out),
                     "--disable-tqdm", "--num-warmups", "1", *extra])
    assert code == 0
    return json.loads(out.read_text())


def _check_exact(run: dict, input_len: int | None, output_len: int) -> None:
    assert run["failed"] == 0, run["errors"]
    assert run["input_len_mismatches"] == 0 and run["output_len_mismatches"] == 0
    for row in run["requests"]:
        assert row["success"]
        if input_len is not None:
            assert row["prompt_tokens"] == input_len
        assert row["output_tokens"] == output_len
        assert 0 < row["ttft"] <= row["latency"]
        assert row["itl_count"] == row["chunks"] - 1


def test_completions_exact_counts_and_json(served, tmp_path):
    result = _bench(served, tmp_path, "--num-prompts", "4", "--input-len", "24", "--output-len", "6",
                    "--goodput", "ttft:60000", "tpot:60000")
    (run,) = result["runs"]
    _check_exact(run, 24, 6)
    assert run["completed"] == 4 and run["total_input_tokens"] == 96 and run["total_output_tokens"] == 24
    assert run["goodput"]["good_requests"] == 4
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(run[key]) >= {"mean", "p50", "p90", "p99"}
        assert run[key]["p50"] <= run[key]["p99"]
    assert run["ttft_ms"]["p99"] <= run["e2el_ms"]["p99"]
    process = run["server_process"]
    assert process["pid"] == served[1] and process["cpu_seconds"] >= 0 and process["peak_rss_mib"] > 0
    assert run["loadavg_start"]


def test_chat_exact_counts_with_concurrency_sweep(served, tmp_path):
    result = _bench(served, tmp_path, "--endpoint", "chat", "--num-prompts", "3", "--input-len", "40",
                    "--output-len", "5", "--concurrency", "1,2")
    assert [r["max_concurrency"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        _check_exact(run, 40, 5)
    assert result["runs"][0]["peak_concurrency"] == 1


def test_sharegpt_and_shared_prefix_runs(served, tmp_path, tokenizer):
    result = _bench(served, tmp_path, "--dataset", "sharegpt", "--num-prompts", "3", "--request-rate", "50",
                    "--max-model-len", "512")
    (run,) = result["runs"]
    assert run["failed"] == 0 and run["input_len_mismatches"] == 0 and run["output_len_mismatches"] == 0
    expected = sharegpt_lengths(3, seed=0, max_total=512)
    assert sorted(r["expected_output_len"] for r in run["requests"]) == sorted(o for _, o in expected)

    result = _bench(served, tmp_path, "--dataset", "shared-prefix", "--num-prompts", "4", "--num-prefixes", "1",
                    "--prefix-len", "64", "--suffix-len", "8", "--output-len", "3", "--max-concurrency", "1")
    (run,) = result["runs"]
    _check_exact(run, 72, 3)
    metrics = run["server_metrics"]
    if metrics.get("prefix_cache_queries"):  # once the server exports prefix-cache counters
        assert metrics["prefix_cache_hit_rate"] > 0


def test_sharegpt_mix_is_deterministic():
    a, b, c = sharegpt_lengths(200, seed=7), sharegpt_lengths(200, seed=7), sharegpt_lengths(200, seed=8)
    assert a == b and a != c
    assert all(4 <= i <= 1024 and 4 <= o <= 1024 for i, o in a)
    mean_in = sum(i for i, _ in a) / len(a)
    assert 100 < mean_in < 350  # log-normal around the published ~200-token mean
    assert all(i + o <= 300 for i, o in sharegpt_lengths(50, seed=1, max_total=300))


def test_workloads_are_exact_and_deterministic(tokenizer):
    builder = PromptBuilder(tokenizer)
    for endpoint in ("completions", "chat"):
        spec = WorkloadSpec(dataset="random", num_prompts=5, input_len=50, output_len=7, endpoint=endpoint, seed=3)
        first = build_workload(spec, tokenizer)
        assert [r.prompt_len for r in first] == [50] * 5
        assert [(r.prompt_ids, r.messages) for r in first] == [(r.prompt_ids, r.messages) for r in build_workload(spec, tokenizer)]
        for r in first:
            if endpoint == "chat":
                assert builder.chat_len(r.messages) == 50
            else:
                assert tokenizer.encode(r.prompt_text, add_special_tokens=False) == r.prompt_ids
    spec = WorkloadSpec(dataset="shared-prefix", num_prompts=8, num_prefixes=2, prefix_len=32, suffix_len=4)
    reqs = build_workload(spec, tokenizer)
    prefixes = {tuple(r.prompt_ids[:32]) for r in reqs}
    assert len(prefixes) == 2 and all(len(r.prompt_ids) == 36 for r in reqs)


def test_arrivals_goodput_and_metrics_parsing():
    assert arrival_gaps(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]
    gaps = arrival_gaps(2000, 4.0, 1.0, 0)
    assert gaps == arrival_gaps(2000, 4.0, 1.0, 0)
    assert 0.2 < sum(gaps) / len(gaps) < 0.3
    assert parse_goodput(["ttft:500", "tpot:100"]) == {"ttft": 0.5, "tpot": 0.1}
    with pytest.raises(BenchError):
        parse_goodput(["speed:1"])
    text_before = (
        '# HELP vllm:prefix_cache_hits_total x\nvllm:prefix_cache_hits_total{engine="0"} 10.0\n'
        'vllm:prefix_cache_queries_total{engine="0"} 40.0\n'
    )
    text_after = (
        'vllm:prefix_cache_hits_total{engine="0"} 40.0\nvllm:prefix_cache_queries_total{engine="0"} 100.0\n'
        'vllm:num_preemptions_total{engine="0"} 2\n'
    )
    delta = metrics_delta(parse_prometheus(text_before), parse_prometheus(text_after))
    assert delta["metric_prefix"] == "vllm:" and delta["prefix_cache_hit_rate"] == pytest.approx(0.5)
    ours = parse_prometheus('pagedserve:prefix_cache_queries_total{model_name="m"} 8\n'
                            'pagedserve:prefix_cache_hits_total{model_name="m"} 6\n')
    delta = metrics_delta({"pagedserve:prefix_cache_queries_total": 0.0}, ours)
    assert delta["metric_prefix"] == "pagedserve:" and delta["prefix_cache_hit_rate"] == pytest.approx(0.75)
    assert metrics_delta(None, ours) == {"available": False}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedserve: error:"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bench_errors_are_one_line_with_exit_code_2(served):
    from api_server import free_port

    down = f"http://127.0.0.1:{free_port()}"
    _one_line_error(_cli("bench", "serve", "--base-url", down), "cannot reach", down, "--base-url")
    _one_line_error(_cli("bench", "soak", "--base-url", down, "--duration", "0.05"), "cannot reach", down)
    url, _ = served
    _one_line_error(_cli("bench", "serve", "--base-url", url, "--tokenizer", "/no/such/dir"), "--tokenizer", "/no/such/dir")
    _one_line_error(_cli("bench", "serve", "--base-url", url + "/nowhere"), "HTTP 404")
    _one_line_error(_cli("bench", "soak", "--base-url", url, "--duration", "0"), "--duration")


def test_tokenizer_from_a_local_dir_or_the_local_hub_cache(demo_dir, tmp_path):
    assert resolve_tokenizer(None, None, demo_dir).vocab_size > 0
    # a server elsewhere that names a directory of its own machine and an uncached Hub id: a clear error
    with pytest.raises(BenchError, match="pass --tokenizer"):
        resolve_tokenizer(None, "acme/not-cached", "/srv/models/not-here")
    # a Hub id already in the Hugging Face cache (its real layout: refs/main -> snapshots/<commit>/)
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--acme--demo" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (snapshot / name).write_bytes((ensure_demo_model() / name).read_bytes())
    (tmp_path / "hub" / "models--acme--demo" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--demo" / "refs" / "main").write_text(commit)
    code = "from server.bench.target import resolve_tokenizer as r; print(r(None, None, 'acme/demo').vocab_size)"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert found.returncode == 0 and int(found.stdout.split()[-1]) > 0, found.stderr


def test_soak_short_run_reports_drift_kv_and_statuses(served, tmp_path):
    url, _ = served
    out = tmp_path / "soak.json"
    code = cli_main(["bench", "soak", "--base-url", url, "--duration", "0.1", "--interval", "2", "--warmup", "2",
                     "--concurrency", "4", "--max-tokens", "8", "--idle-timeout", "20", "--result-json", str(out)])
    s = json.loads(out.read_text())
    assert code == 0, {k: s[k] for k in ("by_kind", "kv_usage_end", "server_errors_5xx", "unexpected")}
    assert s["server_errors_5xx"] == 0 and s["unexpected"] == 0 and s["kv_usage_end"] == 0 and s["running_end"] == 0
    assert s["requests"] >= len(MIX) and set(s["by_kind"]) == {kind for kind, _ in MIX}
    assert all(status == "cut" for status in s["by_kind"]["cut-stream"])
    assert sum(s["by_status"].values()) == s["requests"] > 0
    assert len(s["intervals"]) == 3 and s["intervals"][-1]["done"] <= s["requests"]
    for row in s["intervals"]:
        assert set(row) >= {"t", "done", "rss_mb", "kv_usage", "p50_ms", "p99_ms", "by_status"}
        assert row["rss_mb"] > 0 and 0 <= row["kv_usage"] <= 1
    assert s["rss_after_warmup_mb"] > 0 and s["rss_end_mb"] > 0 and s["rss_drift_pct"] is not None
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert s["server_failures_by_reason"].get("disconnected", 0) > 0


def test_soak_reads_rss_kv_and_failures_from_prometheus_text():
    text = (
        "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 2.5e+09\n"
        '# TYPE pagedserve:kv_cache_usage_perc gauge\npagedserve:kv_cache_usage_perc{model_name="m"} 0.25\n'
        '# TYPE pagedserve:num_requests_running gauge\npagedserve:num_requests_running{model_name="m"} 3\n'
        '# TYPE pagedserve:request_failures counter\n'
        'pagedserve:request_failures_total{model_name="m",reason="validation"} 4\n'
        'pagedserve:request_failures_total{model_name="m",reason="disconnected"} 7\n'
    )
    s = read_sample(text, 1.5)
    assert (s.t, s.rss_mb, s.kv_usage, s.running) == (1.5, 2500.0, 0.25, 3.0)
    assert s.failures == {"validation": 4.0, "disconnected": 7.0}
    vllm = read_sample('# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0"} 0.5\n', 0.0)
    assert vllm.kv_usage == 0.5 and vllm.rss_mb is None
