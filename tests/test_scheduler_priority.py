"""--scheduling-policy priority: the waiting queue by (priority, arrival), the preemption victim, and
fcfs refusing a priority it would not honour. Plain ints, no torch."""

import pytest

from server.config import EngineArgs, SchedulerConfig
from server.errors import ConfigError, InvalidRequest
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler.kv_blocks import BlockPool
from server.scheduler.request_queue import FCFSQueue, PriorityQueue
from server.scheduler.scheduler import Scheduler


def make(policy="priority", num_blocks=64, block_size=4, budget=64, max_seqs=8):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=128, policy=policy)
    return Scheduler(config, BlockPool(num_blocks, block_size))


def req(rid, tokens=(1, 2, 3), priority=0, arrival=0.0, max_tokens=16):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, priority=priority), arrival_time=arrival)


def step(sched, token=7):
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.seqs if s.samples}
    sched.update(out, sampled)
    return out


def test_priority_queue_orders_by_priority_then_arrival():
    queue = PriorityQueue()
    for rid, prio, arrival in [("a", 0, 1.0), ("b", -1, 2.0), ("c", 0, 0.5), ("d", 5, 0.0), ("e", -1, 1.5)]:
        queue.add(req(rid, priority=prio, arrival=arrival))
    assert [r.request_id for r in queue] == ["e", "b", "c", "a", "d"]
    queue.remove(next(r for r in queue if r.request_id == "c"))
    assert queue.pop().request_id == "e" and queue.peek().request_id == "b" and len(queue) == 3
    with pytest.raises(ValueError):
        queue.remove(req("zz"))


def test_fcfs_queue_puts_a_preempted_request_first():
    queue = FCFSQueue()
    a, b, c = req("a", priority=9), req("b"), req("c")
    queue.add(a)
    queue.add(b)
    queue.add_preempted(c)
    assert [r.request_id for r in queue] == ["c", "a", "b"]


def test_waiting_requests_start_by_priority():
    sched = make(max_seqs=2)
    for rid, prio, arrival in [("low", 3, 0.0), ("mid", 0, 1.0), ("high", -2, 2.0), ("mid2", 0, 0.5)]:
        sched.add_request(req(rid, priority=prio, arrival=arrival))
    out = sched.schedule()
    assert [s.request.request_id for s in out.seqs] == ["high", "mid2"]
    assert [r.request_id for r in sched.waiting] == ["mid", "low"]


def test_fcfs_keeps_arrival_order_and_refuses_a_priority():
    sched = make(policy="fcfs", max_seqs=1)
    sched.add_request(req("first", arrival=5.0))
    sched.add_request(req("second", arrival=1.0))
    assert [s.request.request_id for s in sched.schedule().seqs] == ["first"]
    with pytest.raises(InvalidRequest) as info:
        sched.add_request(req("urgent", priority=-1))
    assert info.value.param == "priority" and "--scheduling-policy priority" in info.value.message
    assert sched.get_request("urgent") is None


def two_running(policy, first_priority=0, second_priority=0):
    """4 blocks of 4 tokens, all held: "first" (5 prompt tokens) started a step before "second" (7).
    At the next step "first" still fits in its blocks and "second" needs a third one."""
    sched = make(policy, num_blocks=4)
    sched.add_request(req("first", tokens=range(10, 15), priority=first_priority, arrival=0.0, max_tokens=8))
    step(sched)
    sched.add_request(req("second", tokens=range(20, 27), priority=second_priority, arrival=1.0, max_tokens=8))
    step(sched)
    step(sched)
    assert [r.request_id for r in sched.running] == ["first", "second"] and sched.block_pool.num_free_blocks == 0
    return sched


def test_preemption_takes_the_lowest_priority_even_if_already_scheduled():
    sched = two_running("priority", first_priority=5, second_priority=-5)
    out = sched.schedule()  # "first" was scheduled, then "second" found no block: "first" gives its back
    assert [r.request_id for r in out.preempted] == ["first"]
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("second", 1)]
    assert out.num_batched_tokens == 1 and sched.get_request("first").status is RequestStatus.PREEMPTED
    assert [r.request_id for r in sched.waiting] == ["first"] and sched.running == [sched.get_request("second")]


def test_priority_preempts_the_request_itself_and_goes_on():
    sched = two_running("priority", first_priority=-5, second_priority=5)
    out = sched.schedule()  # "second" ranks last: it gives its own blocks back, "first" keeps running
    assert [r.request_id for r in out.preempted] == ["second"] and [s.request.request_id for s in out.seqs] == ["first"]


def test_fcfs_preempts_the_newest():
    sched = two_running("fcfs")
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["second"] and [s.request.request_id for s in out.seqs] == ["first"]


def test_a_preempted_request_waits_behind_requests_that_outrank_it():
    sched = two_running("priority", first_priority=5, second_priority=-5)
    sched.add_request(req("mid", tokens=(1, 2), priority=0, arrival=2.0, max_tokens=4))
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["first"]
    assert [r.request_id for r in sched.waiting] == ["mid", "first"]


def test_scheduling_policy_flag_is_validated():
    EngineArgs(scheduling_policy="priority").validate()
    with pytest.raises(ConfigError, match="--scheduling-policy"):
        EngineArgs(scheduling_policy="lifo").validate()
    assert EngineArgs(scheduling_policy="priority").scheduler_config(128).policy == "priority"
