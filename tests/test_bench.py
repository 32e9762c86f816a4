"""The benchmark client (`pagedserve bench serve`) against our server on the demo model, plus its pure parts.

Fast and never about speed: exact token counts, TTFT <= E2E, the JSON, determinism of workloads.
"""

from __future__ import annotations

import json
import math

import pytest

from server.bench.datasets import (
    PromptBuilder,
    WorkloadSpec,
    build_workload,
    sharegpt_lengths,
)
from server.bench.serve import arrival_gaps
from server.bench.stats import metrics_delta, parse_goodput, parse_prometheus
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
    """Our server in its own process on the demo model; yields (base_url, pid)."""
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
    with pytest.raises(ValueError):
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
