"""Scheduler: admission, one token budget, chunked prefill, preemption, stop rules, aborts.

Plain ints, no torch. The randomized simulation at the end plays a fake runner that writes a
"KV entry" (the identity of the token prefix) into each slot it computes and checks that every
slot a step reads holds the right prefix, so prefix-cache and block-table bugs show up as data
corruption, the way they would on a GPU.
"""

import os
import random
import subprocess
import sys

import pytest

from server.config import SchedulerConfig
from server.errors import ContextTooLong, InvalidRequest, Overloaded
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler.kv_blocks import BlockPool
from server.scheduler.output import SchedulerOutput
from server.scheduler.scheduler import Scheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2


def make(num_blocks=64, block_size=4, budget=64, max_seqs=8, max_len=128, queue=None, caching=True):
    config = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len, max_queued_requests=queue
    )
    return Scheduler(config, BlockPool(num_blocks, block_size, caching))


def req(rid, tokens, eos=(EOS,), **params):
    params.setdefault("max_tokens", 16)
    return Request(rid, list(tokens), SamplingParams(**params), eos_token_ids=eos)


def step(sched, token=100, abort_before_update=()):
    """One engine step; ``token`` is an int or a function of the request."""
    out = sched.schedule()
    sampled = {
        s.request.request_id: token(s.request) if callable(token) else token for s in out.seqs if s.samples
    }
    out.sampled = sampled  # ``seq.samples`` reads live state: record it before update() appends tokens
    for rid in abort_before_update:
        sched.finish(rid)
    finished = sched.update(out, sampled)
    return out, finished


def spans(out):
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.seqs]


def assert_pool_empty(sched):
    pool = sched.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(c == 0 for c in pool.ref_counts)
    assert sched.kv_usage == 0.0


# ---- admission ----------------------------------------------------------------------------------


def test_empty_prompt_is_invalid():
    sched = make()
    with pytest.raises(InvalidRequest) as e:
        sched.add_request(req("a", []))
    assert not isinstance(e.value, ContextTooLong)
    assert sched.num_waiting == 0


def test_too_long_explicit_max_tokens():
    sched = make(max_len=32)
    with pytest.raises(ContextTooLong, match="32") as e:
        sched.add_request(req("a", range(30), max_tokens=5))
    assert "35" in e.value.message and e.value.param == "max_tokens"
    sched.add_request(req("b", range(30), max_tokens=2))
    assert sched.get_request("b").max_tokens == 2
    assert sched.get_request("a") is None and sched.num_waiting == 1


def test_max_tokens_none_fills_context():
    sched = make(max_len=32)
    with pytest.raises(ContextTooLong, match="32"):
        sched.add_request(req("a", range(32), max_tokens=None))
    with pytest.raises(ContextTooLong):
        sched.add_request(req("b", range(40), max_tokens=None))
    r = req("c", range(31), max_tokens=None)
    sched.add_request(r)
    assert r.max_tokens == 1
    r = req("d", range(10), max_tokens=None)
    sched.add_request(r)
    assert r.max_tokens == 22


def test_too_big_for_kv_pool():
    sched = make(num_blocks=4, block_size=4, max_len=64)
    with pytest.raises(ContextTooLong, match="KV cache") as e:
        sched.add_request(req("a", range(10), max_tokens=7))
    assert "16 tokens" in e.value.message
    sched.add_request(req("b", range(10), max_tokens=6))  # exactly 4 blocks
    with pytest.raises(ContextTooLong, match="KV cache"):
        sched.add_request(req("c", range(10), max_tokens=None))  # 64 tokens -> 16 blocks


def test_queue_full_is_overloaded():
    sched = make(queue=2, max_seqs=1)
    sched.add_request(req("a", range(4)))
    sched.add_request(req("b", range(4)))
    with pytest.raises(Overloaded):
        sched.add_request(req("c", range(4)))
    assert sched.num_waiting == 2 and sched.get_request("c") is None
    step(sched)  # a starts running: one queue slot frees up
    sched.add_request(req("c", range(4)))
    with pytest.raises(Overloaded):
        sched.add_request(req("d", range(4)))


def test_duplicate_request_id():
    sched = make()
    sched.add_request(req("a", range(4)))
    with pytest.raises(InvalidRequest):
        sched.add_request(req("a", range(4)))


# ---- scheduling -------------------------------------------------------------------------------


def test_single_request_lifecycle():
    sched = make()
    r = req("a", range(10, 16), max_tokens=3)
    sched.add_request(r)
    assert sched.has_unfinished() and sched.num_waiting == 1
    out, fin = step(sched, 100)
    assert spans(out) == [("a", 0, 6)] and out.seqs[0].request.request_id in out.sampled
    assert r.status is RequestStatus.RUNNING and sched.num_running == 1 and sched.num_waiting == 0
    assert r.num_computed_tokens == 6 and r.output_token_ids == [100] and fin == []
    assert sched.kv_usage == 2 / 64
    out, fin = step(sched, 101)
    assert spans(out) == [("a", 6, 1)]
    out, fin = step(sched, 102)
    assert spans(out) == [("a", 7, 1)]
    assert fin == [r] and r.status is RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    assert r.output_token_ids == [100, 101, 102]
    assert not sched.has_unfinished() and sched.get_request("a") is None
    assert_pool_empty(sched)
    assert sched.schedule().empty


def test_chunked_prefill():
    sched = make(budget=4)
    r = req("a", range(10), max_tokens=2)
    sched.add_request(r)
    out, _ = step(sched)
    assert spans(out) == [("a", 0, 4)] and not out.sampled
    assert r.num_computed_tokens == 4 and r.num_output_tokens == 0
    out, _ = step(sched)
    assert spans(out) == [("a", 4, 4)] and not out.sampled
    out, _ = step(sched, 55)
    assert spans(out) == [("a", 8, 2)] and out.seqs[0].request.request_id in out.sampled
    assert r.output_token_ids == [55] and r.num_computed_tokens == 10
    out, fin = step(sched, 56)
    assert spans(out) == [("a", 10, 1)] and fin == [r]


def test_one_budget_running_first():
    sched = make(budget=8)
    sched.add_request(req("a", range(4), max_tokens=10))
    out, _ = step(sched)
    assert spans(out) == [("a", 0, 4)]
    sched.add_request(req("b", range(100, 120), max_tokens=10))
    out, _ = step(sched)
    assert spans(out) == [("a", 4, 1), ("b", 0, 7)]
    out, _ = step(sched)
    assert spans(out) == [("a", 5, 1), ("b", 7, 7)]
    out, _ = step(sched)
    assert spans(out) == [("a", 6, 1), ("b", 14, 6)] and out.seqs[1].request.request_id in out.sampled
    out, _ = step(sched)
    assert spans(out) == [("a", 7, 1), ("b", 20, 1)]


def test_budget_exhausted_by_running_prefills():
    sched = make(budget=6)
    sched.add_request(req("a", range(10)))
    sched.add_request(req("b", range(100, 110)))
    out, _ = step(sched)
    assert spans(out) == [("a", 0, 6)]
    out, _ = step(sched)
    assert spans(out) == [("a", 6, 4), ("b", 0, 2)]
    out, _ = step(sched)
    assert spans(out) == [("a", 10, 1), ("b", 2, 5)]


def test_max_num_seqs():
    sched = make(max_seqs=2)
    for rid in "abc":
        sched.add_request(req(rid, range(4), max_tokens=2, eos=()))
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["a", "b"] and sched.num_waiting == 1
    out, fin = step(sched)
    assert len(fin) == 2 and sched.num_running == 0
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["c"]


def test_fifo_no_skipping():
    sched = make(num_blocks=8, block_size=4, caching=False)
    sched.add_request(req("a", range(20), max_tokens=5))  # 5 blocks
    sched.add_request(req("b", range(16), max_tokens=4))  # 4 blocks: does not fit next to a
    sched.add_request(req("c", range(2), max_tokens=2))  # would fit, but waits its turn
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.block_pool.num_free_blocks == 3


def test_preempt_newest_and_resume_with_outputs():
    sched = make(num_blocks=6, block_size=4, caching=False)
    a = req("a", range(8), max_tokens=12, eos=())
    b = req("b", range(50, 58), max_tokens=12, eos=())
    sched.add_request(a)
    sched.add_request(b)
    counter = iter(range(1000, 2000))
    tok = lambda r: next(counter)  # noqa: E731
    step(sched, tok)  # both prefills: 2 blocks each
    for _ in range(4):  # decode to 12 tokens each: 3 blocks each, pool full
        out, _ = step(sched, tok)
        assert not out.preempted
    assert sched.block_pool.num_free_blocks == 0 and a.num_tokens == 13
    b_outputs = list(b.output_token_ids)
    out, _ = step(sched, tok)  # a needs a 4th block: b (newest) is preempted
    assert out.preempted == [b] and spans(out) == [("a", 12, 1)]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and sched.num_preemptions_total == 1
    assert list(sched.waiting) == [b] and sched.num_running == 1
    assert b.output_token_ids == b_outputs  # outputs are kept
    while a.status is RequestStatus.RUNNING:
        out, _ = step(sched, tok)
        assert all(s.request is a for s in out.seqs)  # b does not fit until a finishes
    assert a.status is RequestStatus.FINISHED_LENGTH
    out, _ = step(sched, 777)
    # b recomputes its prompt and its earlier outputs, then samples its next token.
    assert spans(out) == [("b", 0, 8 + len(b_outputs))] and out.seqs[0].request.request_id in out.sampled
    assert b.output_token_ids == b_outputs + [777]
    while sched.has_unfinished():
        step(sched, tok)
    assert b.status is RequestStatus.FINISHED_LENGTH and b.num_output_tokens == 12
    assert b.output_token_ids[: len(b_outputs) + 1] == b_outputs + [777]
    assert_pool_empty(sched)


def test_preempt_self_when_newest():
    sched = make(num_blocks=4, block_size=4, caching=False)
    a = req("a", range(5), max_tokens=3)
    b = req("b", range(50, 58), max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.block_pool.num_free_blocks == 0
    out, _ = step(sched)  # a fits in its second block; b needs a third and is the newest
    assert spans(out) == [("a", 5, 1)] and out.preempted == [b]
    assert list(sched.waiting) == [b] and sched.running == [a]


def test_no_waiting_admitted_in_a_step_with_preemption():
    sched = make(num_blocks=4, block_size=4, caching=False)
    a = req("a", range(5), max_tokens=3)
    b = req("b", range(50, 58), max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    sched.add_request(req("c", [1], max_tokens=1))
    out, _ = step(sched)
    assert out.preempted == [b] and [s.request.request_id for s in out.seqs] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # the preempted one goes first


def test_prefix_cache_hit_on_schedule():
    sched = make(block_size=4)
    a = req("a", range(12), max_tokens=1)
    sched.add_request(a)
    step(sched)
    assert a.status is RequestStatus.FINISHED_LENGTH
    b = req("b", list(range(10)) + [99, 98], max_tokens=2)
    sched.add_request(b)
    out, _ = step(sched)
    assert spans(out) == [("b", 8, 4)]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 12
    assert sched.block_pool.prefix_hits == 8
    c = req("c", range(12), max_tokens=1, prompt_logprobs=0)
    sched.add_request(c)
    out, _ = step(sched)
    assert ("c", 0, 12) in spans(out) and c.num_cached_tokens == 0


def test_cached_tokens_kept_from_first_schedule():
    sched = make(num_blocks=6, block_size=4)
    a = req("a", range(8), max_tokens=12, eos=())
    b = req("b", range(50, 58), max_tokens=12, eos=())
    sched.add_request(a)
    sched.add_request(b)
    while not b.num_preemptions:
        step(sched, 5)
    while b.status is not RequestStatus.RUNNING:
        out, _ = step(sched, 5)
    resumed = [s for s in out.seqs if s.request is b][0]
    assert resumed.start > 0  # b found its own blocks in the cache
    assert b.num_cached_tokens == 0  # still what the first schedule found
    while sched.has_unfinished():
        step(sched, 5)
    assert_pool_empty(sched)


# ---- stop rules -----------------------------------------------------------------------------------


def run_tokens(tokens, prompt=range(10, 14), max_len=128, **params):
    """Feed ``tokens`` as the sampled outputs until the request finishes; return it."""
    sched = make(max_len=max_len)
    r = req("r", prompt, **params)
    sched.add_request(r)
    feed = iter(tokens)
    while r.status is not RequestStatus.FINISHED_LENGTH and not r.status.finished:
        step(sched, lambda _: next(feed))
    assert_pool_empty(sched)
    return r


def test_eos_stops():
    r = run_tokens([5, 6, EOS, 7], max_tokens=10)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.finish_reason == "stop"
    assert r.output_token_ids == [5, 6, EOS] and r.stop_reason is None


def test_ignore_eos():
    r = run_tokens([EOS] * 4, max_tokens=4, ignore_eos=True)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [EOS] * 4


def test_min_tokens_defers_eos_and_stop_tokens():
    r = run_tokens([EOS, EOS, EOS, 5], max_tokens=10, min_tokens=3)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.num_output_tokens == 3
    r = run_tokens([7, 7, 8, 7], max_tokens=10, min_tokens=4, stop_token_ids=[7])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.num_output_tokens == 4 and r.stop_reason == 7


def test_stop_token_ids():
    r = run_tokens([5, 9, 8], max_tokens=10, stop_token_ids=[8, 9])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 9 and r.output_token_ids == [5, 9]
    r = run_tokens([5, 9], max_tokens=10, stop_token_ids=[9], ignore_eos=True)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 9


def test_stop_wins_over_length_on_last_token():
    r = run_tokens([5, EOS], max_tokens=2)
    assert r.status is RequestStatus.FINISHED_STOPPED
    r = run_tokens([5, 5, 5], max_tokens=3, eos=())
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3


def test_max_tokens_one_finishes_after_prefill():
    r = run_tokens([5], max_tokens=1)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [5]


def test_max_model_len_stops():
    r = run_tokens([5] * 10, prompt=range(10), max_len=14, max_tokens=None)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 14 and r.num_output_tokens == 4


# ---- finishing from outside --------------------------------------------------------------------------


def test_abort_waiting():
    sched = make()
    r = req("a", range(4))
    sched.add_request(r)
    assert sched.finish("a") is r
    assert r.status is RequestStatus.FINISHED_ABORTED and r.finish_reason == "abort"
    assert not sched.has_unfinished() and sched.get_request("a") is None
    assert sched.finish("a") is None and sched.finish("nope") is None


def test_abort_running_mid_prefill():
    sched = make(budget=4)
    r = req("a", range(10))
    sched.add_request(r)
    step(sched)
    assert r.num_computed_tokens == 4 and r.block_ids
    sched.finish("a")
    assert not sched.has_unfinished() and r.block_ids == []
    assert_pool_empty(sched)


def test_abort_running_decode_keeps_others():
    sched = make()
    a, b = req("a", range(6)), req("b", range(10, 16))  # no shared block: b is not held for a's
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    step(sched)
    sched.finish("a")
    assert sched.running == [b]
    out, _ = step(sched)
    assert spans(out) == [("b", 7, 1)]
    sched.finish("b", RequestStatus.FINISHED_STOPPED)  # a stop string found by the detokenizer
    assert b.status is RequestStatus.FINISHED_STOPPED
    assert_pool_empty(sched)


def test_abort_preempted():
    sched = make(num_blocks=4, block_size=4, caching=False)
    a, b = req("a", range(5), max_tokens=3), req("b", range(50, 58), max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out, _ = step(sched)
    assert out.preempted == [b]
    sched.finish("b")
    assert sched.num_waiting == 0 and b.status is RequestStatus.FINISHED_ABORTED
    sched.finish("a")
    assert_pool_empty(sched)


def test_abort_between_schedule_and_update():
    sched = make()
    a, b = req("a", range(6)), req("b", range(10, 16))  # no shared block: b is not held for a's
    sched.add_request(a)
    sched.add_request(b)
    out, fin = step(sched, abort_before_update=["a"])
    assert fin == [] and a.status is RequestStatus.FINISHED_ABORTED and a.num_output_tokens == 0
    assert b.num_output_tokens == 1 and sched.running == [b]
    sched.finish("b")
    assert_pool_empty(sched)


def test_finish_needs_finished_status():
    sched = make()
    sched.add_request(req("a", range(4)))
    with pytest.raises(ValueError):
        sched.finish("a", RequestStatus.RUNNING)


def test_imports_no_torch():
    code = (
        "import sys\n"
        "import server.scheduler.scheduler, server.scheduler.kv_blocks\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- randomized simulation ----------------------------------------------------------------------------


class FakeRunner:
    """Writes the identity of each computed position's prefix into its KV slot and checks reads."""

    def __init__(self, pool):
        self.pool = pool
        self.kv = {}  # (block id, offset) -> prefix tuple

    def execute(self, out):
        bs = self.pool.block_size
        for seq in out.seqs:
            r = seq.request
            assert len(r.block_ids) * bs >= seq.end
            for pos in range(seq.start):  # the context attention reads
                slot = (r.block_ids[pos // bs], pos % bs)
                assert self.kv.get(slot) == tuple(r.all_token_ids[: pos + 1]), f"stale KV for {r} at {pos}"
            for pos in range(seq.start, seq.end):
                block = r.block_ids[pos // bs]
                assert self.pool.ref_counts[block] == 1, "writing into a shared block"
                assert not self.pool.is_cached(block), "writing into a cached block"
                self.kv[(block, pos % bs)] = tuple(r.all_token_ids[: pos + 1])


def check_invariants(sched, out, running_before, waiting_before):
    cfg, pool = sched.config, sched.block_pool
    bs = pool.block_size
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.seqs) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    ids = [s.request.request_id for s in out.seqs]
    assert len(set(ids)) == len(ids)
    for s in out.seqs:
        r = s.request
        assert r.status is RequestStatus.RUNNING and r in sched.running
        assert s.num_new_tokens >= 1 and s.start == r.num_computed_tokens and s.end <= r.num_tokens
    new = [i for i in ids if i not in running_before]
    if out.preempted:
        assert not new, "waiting requests admitted in a step with preemption"
    held = [r.request_id for r in sched.held]
    assert new == [i for i in waiting_before if i not in held][: len(new)], "waiting requests must start in FIFO order"
    for r in out.preempted:
        assert r.status is RequestStatus.PREEMPTED and r.block_ids == [] and r.num_computed_tokens == 0
    for r in sched.waiting:
        assert r.block_ids == [] and r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
    # Ref counts are exactly the block tables of running requests; a shared block is cached and full.
    counts = [0] * pool.num_blocks
    owners = {}
    for r in sched.running:
        assert len(set(r.block_ids)) == len(r.block_ids)
        for i, b in enumerate(r.block_ids):
            counts[b] += 1
            owners.setdefault(b, []).append((r, i))
    assert counts == pool.ref_counts
    assert pool.num_free_blocks == counts.count(0)
    assert pool.usage == pytest.approx(1 - counts.count(0) / pool.num_blocks)
    for b, users in owners.items():
        if len(users) > 1:
            assert pool.is_cached(b)
            assert all((i + 1) * bs <= r.num_computed_tokens for r, i in users)
    assert set(sched.requests) == {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting}


def simulate(seed, num_blocks, block_size, budget, max_seqs, caching, queue=None, num_requests=120):
    rng = random.Random(seed)
    max_len = 64
    sched = make(num_blocks, block_size, budget, max_seqs, max_len, queue, caching)
    runner = FakeRunner(sched.block_pool)
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(4, 24))] for _ in range(4)]
    all_requests, outputs = [], {}
    next_id, steps, held_total = 0, 0, 0
    while next_id < num_requests or sched.has_unfinished():
        steps += 1
        assert steps < 20000, "the simulation does not terminate"
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3]) if next_id < num_requests else 0):
            prompt = (rng.choice(prefixes) if rng.random() < 0.7 else []) + [
                rng.randrange(3, 50) for _ in range(rng.randrange(0 if rng.random() < 0.5 else 1, 20))
            ]
            prompt = prompt or [7]
            params = dict(
                max_tokens=rng.choice([None, 1, 2, rng.randrange(1, 30)]),
                ignore_eos=rng.random() < 0.2,
                stop_token_ids=rng.sample(range(3, 50), rng.choice([0, 0, 1, 2])),
                prompt_logprobs=1 if rng.random() < 0.1 else None,
            )
            if params["max_tokens"] is not None:
                params["min_tokens"] = rng.randrange(0, params["max_tokens"] + 1)
            r = req(f"r{next_id}", prompt, **params)
            next_id += 1
            try:
                sched.add_request(r)
            except (ContextTooLong, Overloaded):
                continue
            all_requests.append(r)
            outputs[r.request_id] = []
        if rng.random() < 0.03 and sched.requests:
            sched.finish(rng.choice(sorted(sched.requests)))
        if not sched.has_unfinished():
            continue
        running_before = {r.request_id for r in sched.running}
        waiting_before = [r.request_id for r in sched.waiting]
        out = sched.schedule()
        assert out.seqs, "no progress although requests are unfinished"
        check_invariants(sched, out, running_before, waiting_before)
        in_flight = {h for r in sched.running for h in sched.block_pool.pending_block_hashes(r)}
        for r in sched.held:  # skipped only while a running request is computing one of its blocks
            assert r in sched.waiting and in_flight.intersection(r.block_hashes)
        held_total += len(sched.held)
        runner.execute(out)
        sampled = {}
        for s in out.seqs:
            if s.samples:
                sampled[s.request.request_id] = EOS if rng.random() < 0.08 else rng.randrange(3, 50)
        aborted = rng.sample(ids, 1) if (ids := sorted(sampled)) and rng.random() < 0.02 else []
        for rid in aborted:
            sched.finish(rid)
        finished = sched.update(out, sampled)
        for rid, token in sampled.items():
            if rid not in aborted:
                outputs[rid].append(token)
        for r in finished:
            assert r.status.finished and r.block_ids == [] and r not in sched.running
            p = r.params
            if r.status is RequestStatus.FINISHED_STOPPED:
                last = r.output_token_ids[-1]
                assert r.num_output_tokens >= p.min_tokens
                assert (last == EOS and not p.ignore_eos) or last in p.stop_token_ids
            else:
                assert r.num_output_tokens == r.max_tokens or r.num_tokens == max_len
        for r in sched.running:
            assert r.output_token_ids == outputs[r.request_id]
        check_invariants(sched, SchedulerOutput(), set(), [])
    for r in all_requests:
        assert r.status.finished and r.block_ids == []
        assert r.output_token_ids == outputs[r.request_id]
        if r.status is not RequestStatus.FINISHED_ABORTED:
            assert 1 <= r.num_output_tokens <= r.max_tokens
    assert not sched.requests
    assert_pool_empty(sched)
    return sched, held_total


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(
    "num_blocks,block_size,budget,max_seqs,caching,queue",
    [
        (24, 4, 32, 8, True, None),  # small pool: preemption
        (24, 4, 32, 8, False, None),
        (200, 4, 64, 4, True, None),  # roomy pool: max_num_seqs binds
        (40, 8, 7, 16, True, 10),  # tiny budget: chunked prefill, queue limit
        (16, 16, 48, 3, True, None),  # large blocks
    ],
)
def test_random_simulation(seed, num_blocks, block_size, budget, max_seqs, caching, queue):
    simulate(seed, num_blocks, block_size, budget, max_seqs, caching, queue)


def test_simulation_exercises_preemption_and_cache():
    preemptions = hits = held = 0
    for seed in range(4):
        s, num_held = simulate(seed, 24, 4, 32, 8, True)
        preemptions += s.num_preemptions_total
        hits += s.block_pool.prefix_hits
        held += num_held
    assert preemptions > 0 and hits > 0 and held > 0


def test_prefix_stats_count_each_start_once():
    sched = make(num_blocks=8, block_size=4)
    a = req("a", range(20), max_tokens=3, eos=())
    b = req("b", range(100, 116), max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    pool = sched.block_pool
    step(sched)
    step(sched)
    assert b.status is RequestStatus.WAITING  # blocked at the head of the queue, looked up each step
    assert (pool.prefix_queries, pool.prefix_hits) == (20, 0)
    while b.status is RequestStatus.WAITING:
        step(sched)
    assert (pool.prefix_queries, pool.prefix_hits) == (36, 0)
    c = req("c", range(13), max_tokens=1)
    sched.add_request(c)
    while c.status is RequestStatus.WAITING:
        step(sched)
    assert (pool.prefix_queries, pool.prefix_hits) == (49, 12)


def test_prefill_work_is_a_waiting_request_or_a_running_prompt_not_yet_through():
    sched = make(budget=8)
    assert not sched.has_prefill_work()
    sched.add_request(req("a", range(1, 13)))  # 12 prompt tokens: two chunks of 8 and 4
    assert sched.has_prefill_work()
    step(sched)  # first chunk: running, 4 prompt tokens left
    assert not sched.waiting and sched.has_prefill_work()
    step(sched)  # rest of the prompt and the first token
    assert not sched.has_prefill_work()  # decodes only from here
    sched.add_request(req("b", range(20, 23)))
    assert sched.has_prefill_work()
