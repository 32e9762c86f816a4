"""Compute threads from the affinity mask and the cgroup CPU quota (fake cgroup files in tmp dirs), and
the engine process logging the plan it applied."""

from __future__ import annotations

import functools
import logging

import pytest

from server.config import EngineArgs
from server.demo import ensure_demo_model
from server.engine.process import ProcessEngineClient
from server.engine.threads import DECODE_ALL_FROM, SPLIT_FROM, ThreadPlan, cgroup_cpu_limit, plan_threads


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "cpus"), [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)]
)
def test_fake_cgroup_v2_cpu_max_rounds_the_quota_up(tmp_path, cpu_max, cpus):
    _write(tmp_path / "cpu.max", cpu_max)
    assert cgroup_cpu_limit(tmp_path) == cpus


@pytest.mark.parametrize("controller", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize(("quota", "cpus"), [("300000", 3), ("250000", 3), ("-1", None)])
def test_fake_cgroup_v1_cfs_quota(tmp_path, controller, quota, cpus):
    _write(tmp_path / controller / "cpu.cfs_quota_us", quota + "\n")
    _write(tmp_path / controller / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path) == cpus


def test_no_cgroup_files_mean_no_limit_fake_empty_root(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None


def test_a_malformed_fake_cpu_max_means_no_limit(tmp_path):
    _write(tmp_path / "cpu.max", "lots 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_enough_cores_give_the_api_process_one_of_its_own():
    plan = plan_threads(set(range(8)), None, "")
    assert plan.engine_threads == 7 and plan.one_process_threads == 8
    assert plan.engine_cores == tuple(range(7)) and plan.api_cores == (7,)
    assert plan.describe().startswith("Compute threads: 7 on cores 0-6; API process on 7 (8 cores in the affinity mask")


def test_few_cores_are_shared_by_the_api_and_the_engine():
    plan = plan_threads({2, 5}, None, "")
    assert plan.engine_threads == plan.one_process_threads == 2
    assert plan.engine_cores == plan.api_cores == (2, 5)
    assert f"fewer than {SPLIT_FROM}" in plan.reason
    # small decode-only steps leave the API process a core; prefill work and wide decode steps take them all
    assert plan.threads_for(prefill=False, decode_batch=1) == 1 and plan.threads_for(prefill=True, decode_batch=1) == 2
    assert plan.threads_for(prefill=False, decode_batch=DECODE_ALL_FROM) == 2
    assert plan.describe().startswith(
        f"Compute threads: 2 (1 for decode-only steps of fewer than {DECODE_ALL_FROM} sequences) on cores 2,5"
    )


def test_one_core_and_own_cores_decode_on_every_engine_thread():
    assert plan_threads({0}, None, "").threads_for(prefill=False, decode_batch=1) == 1
    plan = plan_threads(set(range(8)), None, "")
    assert plan.threads_for(prefill=False, decode_batch=1) == plan.threads_for(prefill=True, decode_batch=1) == 7
    assert plan_threads({0, 1}, None, "2").threads_for(prefill=False, decode_batch=1) == 2  # OMP_NUM_THREADS decides
    assert "decode-only" not in plan.describe() and "decode-only" not in plan_threads({0}, None, "").describe()


@pytest.mark.parametrize(
    ("prefill", "decode_batch", "threads"),
    [(False, 1, 2), (False, 15, 2), (False, 16, 4), (False, 64, 4), (True, 1, 4), (True, 15, 4)],
)
def test_decode_only_steps_take_every_thread_from_the_threshold_batch(prefill, decode_batch, threads):
    plan = ThreadPlan(4, 4, (0, 1, 2, 3), (0, 1, 2, 3), "test", decode_threads=2, decode_all_from=16)
    assert plan.threads_for(prefill=prefill, decode_batch=decode_batch) == threads


def test_a_quota_below_the_mask_sets_the_count_and_pins_nothing():
    plan = plan_threads(set(range(16)), 4, "")
    assert plan.engine_threads == 3 and plan.one_process_threads == 4
    assert plan.engine_cores == plan.api_cores == tuple(range(16))
    small = plan_threads(set(range(16)), 2, "")
    assert small.engine_threads == 2 and small.engine_cores == tuple(range(16))


def test_a_quota_above_the_mask_changes_nothing():
    assert plan_threads(set(range(4)), 6, "").engine_cores == (0, 1, 2)


def test_omp_num_threads_still_decides_the_count():
    plan = plan_threads(set(range(8)), None, "3")
    assert plan.engine_threads == plan.one_process_threads == 3
    assert plan.api_cores == (7,)  # the cores are still split
    assert "OMP_NUM_THREADS=3" in plan.reason
    assert plan_threads(set(range(8)), None, "many").engine_threads == 7


def test_the_engine_process_logs_the_threads_it_chose(tmp_path):
    log = tmp_path / "engine.log"
    setup = functools.partial(logging.basicConfig, filename=str(log), level=logging.INFO, format="%(message)s")
    client = ProcessEngineClient(
        EngineArgs(model=str(ensure_demo_model()), dtype="float32", max_model_len=128, kv_cache_memory=0.02),
        setup_logging=setup,
    )
    try:
        with open(f"/proc/{client.pid}/status") as status:
            allowed = next(line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list"))
    finally:
        client.shutdown()
    want = plan_threads()
    lines = [line for line in log.read_text().splitlines() if line.startswith("Compute threads:")]
    assert lines == [want.describe()]
    assert allowed == want.describe().split(" on cores ")[1].split(";")[0]
