"""The prepared GPU check (scripts/gpu-check.sh) in its --smoke mode: every step runs at toy sizes on
this machine (the Triton kernels under TRITON_INTERPRET=1, which conftest.py sets without a GPU), so
the script cannot rot between the rare runs on a GPU. Checks the JSON's shape, that each step ended
ok or skipped with a reason, and the figures each step must leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import STEPS  # noqa: E402
from gpu_check_bench import LLAMA_8B, QWEN3_06B, streamed_weight_bytes  # noqa: E402
from gpu_check_e2e import compare  # noqa: E402
from gpu_check_step import STATUSES  # noqa: E402


def _run(out: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--out", str(out), *args],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "gpu-check.json"
    proc, doc = _run(out, "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, doc


def test_smoke_runs_every_step_and_each_is_ok_or_skipped_with_a_reason(smoke):
    proc, doc = smoke
    assert doc["schema"] == 1 and doc["mode"] == "smoke" and doc["finished"]
    assert list(doc["steps"]) == list(STEPS)
    for name, step in doc["steps"].items():
        assert step["status"] in ("ok", "skip"), (name, step)
        assert step["status"] == "ok" or step["reason"], name
        assert step["seconds"] <= step["budget_s"] and isinstance(step["summary"], list)
        for key, case in step["results"].items():
            if isinstance(case, dict) and "status" in case:
                assert case["status"] in ("ok", "skip"), (name, key, case)
                assert case["status"] == "ok" or case["reason"], (name, key)
        assert f"[{name}] {step['status']}" in proc.stdout
    assert "5/5 steps ok or skipped" in proc.stdout


def test_smoke_env_measures_a_bandwidth(smoke):
    env = smoke[1]["steps"]["env"]["results"]
    assert env["versions"]["torch"] and env["bandwidth"]["median_gbs"] > 0


def test_smoke_kernel_cases_are_within_their_bounds(smoke):
    step = smoke[1]["steps"]["kernels"]
    if step["status"] == "skip":
        pytest.skip(f"the kernels step skipped: {step['reason']}")
    cases = {k: v for k, v in step["results"].items() if isinstance(v, dict) and "status" in v}
    assert {"kv_store_bfloat16", "extend_mixed", "decode_b4_ragged40_window7", "decode_time_b1"} <= set(cases)
    for key, case in cases.items():
        assert case["status"] == "ok", (key, case)
        if "max_abs_err" in case:
            assert case["max_excess"] <= 0 and case["finite"], key
    assert {case["kernel"] for case in cases.values() if "kernel" in case} == {"decode", "extend"}


def test_smoke_e2e_float32_eager_equals_transformers(smoke):
    results = smoke[1]["steps"]["e2e"]["results"]
    eager = results["float32/eager"]
    assert eager["status"] == "ok" and eager["mismatches"] == 0 and eager["token_agreement"] == 1.0
    assert 0 < results["bfloat16/eager"]["token_agreement"] <= 1
    for mode in ("compiled", "graphs"):  # on CPU: skipped, with the reason (arguments checked, or not available)
        assert results[f"float32/{mode}"]["status"] == "skip" and results[f"float32/{mode}"]["reason"]


def test_smoke_benchmarks_record_their_figures(smoke):
    for name in ("bench_llama8b", "bench_qwen3"):
        results = smoke[1]["steps"][name]["results"]
        tpot = results["tpot_batch1"]
        assert tpot["tpot_median_ms"] > 0 and tpot["floor_ms"] > 0 and tpot["decode_steps"] == 8
        assert results["startup"]["streamed_bytes"] > 0
    throughput = smoke[1]["steps"]["bench_llama8b"]["results"]["sharegpt_16"]
    assert throughput["finished"] == 16 and throughput["output_tokens"] == throughput["expected_output_tokens"]
    assert throughput["output_tok_s"] > 0


def test_a_step_past_its_budget_is_killed_and_the_next_step_still_runs(tmp_path):
    """A budget of 0.3 s is shorter than importing torch: the step is killed, reported as a timeout
    with the tail of its output, the run goes on, and the exit code says something was not ok."""
    proc, doc = _run(tmp_path / "out.json", "--smoke", "--steps", "kernels,env", "--budget", "kernels=0.3")
    assert proc.returncode == 1
    assert doc["steps"]["kernels"]["status"] == "timeout" and "budget" in doc["steps"]["kernels"]["reason"]
    assert "log_tail" in doc["steps"]["kernels"]
    assert doc["steps"]["env"]["status"] == "ok"
    assert "not ok: kernels" in proc.stdout


def test_unknown_steps_and_bad_budgets_are_refused(tmp_path):
    for args in (["--steps", "env,nope"], ["--budget", "nope=3"], ["--budget", "env=soon"], ["--budget", "env=0"]):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "x.json"), *args],
                              check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "error:" in proc.stderr, args
    assert set(STATUSES) >= {"ok", "skip", "timeout"}


def test_weight_read_floor_counts_the_published_bytes():
    """Llama-3.1-8B streams 15.01 GB of bf16 weights per decode step (its input embedding is only
    gathered), Qwen3-0.6B 1.19 GB (tied: the table is read once, as the output projection)."""
    from transformers import AutoConfig

    def config(spec):
        spec = dict(spec)
        spec.pop("architecture")
        return AutoConfig.for_model(spec.pop("model_type"), **spec)

    llama = streamed_weight_bytes(config(LLAMA_8B), 2)
    assert llama["parameters"] == 8_030_261_248 and round(llama["streamed_bytes"] / 1e9, 2) == 15.01
    qwen = streamed_weight_bytes(config(QWEN3_06B), 2)
    assert qwen["tied_embeddings"] and round(qwen["streamed_bytes"] / 1e9, 2) == 1.19


def test_compare_counts_tokens_up_to_the_first_divergence():
    result = compare([[1, 2, 3], [4, 5, 9, 7]], [[1, 2, 3], [4, 5, 6, 7]])
    assert result["exact_sequences"] == 1 and result["mismatches"] == 1
    assert result["token_agreement"] == round(5 / 7, 4)
    assert result["first_mismatch"] == {"prompt": 1, "position": 2, "ours": [9, 7], "reference": [6, 7]}
