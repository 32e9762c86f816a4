"""Requests that share a prefix a running request is still computing wait for its blocks, then hit them.

Plain ints, no torch, except the last test, which runs a tiny random model end to end.
"""

from server.config import SchedulerConfig
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler.kv_blocks import BlockPool
from server.scheduler.scheduler import Scheduler

PREFIX = list(range(10, 34))  # 24 tokens: 6 blocks of 4


def make(num_blocks=64, block_size=4, budget=64, max_seqs=8, policy="fcfs", caching=True):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=128, policy=policy)
    return Scheduler(config, BlockPool(num_blocks, block_size, caching))


def req(rid, tokens, **params):
    params.setdefault("max_tokens", 4)
    return Request(rid, list(tokens), SamplingParams(**params), eos_token_ids=())


def step(sched, token=7):
    out = sched.schedule()
    finished = sched.update(out, {s.request.request_id: token for s in out.seqs if s.samples})
    return out, finished


def spans(out):
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.seqs]


def held(sched):
    return [r.request_id for r in sched.held]


def stats(sched):
    return sched.block_pool.prefix_queries, sched.block_pool.prefix_hits


def drain(sched):
    while sched.has_unfinished():
        step(sched)
    pool = sched.block_pool
    assert pool.num_free_blocks == pool.num_blocks and not any(pool.ref_counts)


def test_two_requests_same_step_second_hits_first():
    sched = make()
    a, b = req("a", PREFIX[:8] + [1, 2, 3]), req("b", PREFIX[:8] + [4, 5, 6])
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert spans(out) == [("a", 0, 11)] and held(sched) == ["b"]
    assert stats(sched) == (11, 0)  # b is not counted while held
    out, _ = step(sched)
    assert spans(out) == [("a", 11, 1), ("b", 8, 3)] and held(sched) == []
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert stats(sched) == (22, 8)
    drain(sched)
    assert stats(sched) == (22, 8)


def test_many_requests_same_step_all_hit():
    sched = make()
    reqs = [req(f"r{i}", PREFIX[:8] + [100 + i, 1]) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched)
    assert spans(out) == [("r0", 0, 10)] and held(sched) == ["r1", "r2", "r3", "r4"]
    out, _ = step(sched)
    assert spans(out) == [("r0", 10, 1)] + [(f"r{i}", 8, 2) for i in range(1, 5)]
    assert [sched.block_pool.ref_counts[b] for b in reqs[0].block_ids[:2]] == [5, 5]
    assert stats(sched) == (50, 32)
    drain(sched)


def test_chunked_prefill_of_a_long_prefix():
    """b looks for a's blocks only once a's prefill leaves budget over: in a's last chunk, which holds
    the end of the prefix, so b waits one step more for it instead of computing it again."""
    sched = make(budget=10)
    a, b = req("a", PREFIX + [1, 2]), req("b", PREFIX + [3, 4])
    sched.add_request(a)
    sched.add_request(b)
    for start in (0, 10):
        out, _ = step(sched)
        assert spans(out) == [("a", start, 10)] and held(sched) == []  # the budget ran out before b
    out, _ = step(sched)
    assert spans(out) == [("a", 20, 6)] and held(sched) == ["b"]  # 20 tokens cached, block 5 in flight
    assert stats(sched) == (26, 0)
    out, _ = step(sched)
    assert spans(out) == [("a", 26, 1), ("b", 24, 2)]
    assert b.num_cached_tokens == 24 and stats(sched) == (52, 24)
    drain(sched)


def test_held_only_for_the_blocks_it_shares():
    sched = make()
    a, b = req("a", PREFIX[:8] + [1] * 4), req("b", PREFIX[:4] + [2] * 8)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched)
    assert spans(out) == [("a", 0, 12)] and held(sched) == ["b"]
    out, _ = step(sched)
    assert spans(out) == [("a", 12, 1), ("b", 4, 8)] and b.num_cached_tokens == 4
    drain(sched)


def test_unrelated_requests_are_not_held_and_go_past_a_held_one():
    sched = make()
    sched.add_request(req("a", PREFIX[:8] + [1]))
    sched.add_request(req("b", PREFIX[:8] + [2]))
    sched.add_request(req("c", range(50, 59)))
    sched.add_request(req("d", PREFIX[:8] + [3], cache_salt="other tenant"))  # never shares a's blocks
    sched.add_request(req("e", PREFIX[:8] + [4], prompt_logprobs=0))  # computes every position anyway
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["a", "c", "d", "e"] and held(sched) == ["b"]
    out, _ = step(sched)
    assert ("b", 8, 1) in spans(out)
    drain(sched)


def test_no_holding_without_prefix_caching():
    sched = make(caching=False)
    sched.add_request(req("a", PREFIX))
    sched.add_request(req("b", PREFIX))
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["a", "b"] and held(sched) == []
    drain(sched)


def test_computing_request_aborted_mid_prefill_releases_waiter_next_step():
    sched = make(budget=10)
    a, b = req("a", PREFIX + [1]), req("b", PREFIX + [2])
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    step(sched)
    out = sched.schedule()
    assert spans(out) == [("a", 20, 5)] and held(sched) == ["b"]
    sched.finish("a")  # this chunk is dropped: only the blocks of a's first two chunks are cached
    sched.update(out, {"a": 7})
    out, _ = step(sched)
    assert spans(out) == [("b", 20, 5)] and held(sched) == []
    assert b.num_cached_tokens == 20 and stats(sched) == (50, 20)
    drain(sched)


def test_computing_request_aborted_between_schedule_and_update():
    sched = make()
    a, b = req("a", PREFIX + [1]), req("b", PREFIX + [2])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert held(sched) == ["b"]
    sched.finish("a")  # its step ran but is dropped: nothing of it is cached
    sched.update(out, {"a": 7})
    out, _ = step(sched)
    assert spans(out) == [("b", 0, 25)] and b.num_cached_tokens == 0
    drain(sched)


def test_computing_request_finishing_in_its_first_step():
    sched = make()
    sched.add_request(req("a", PREFIX + [1], max_tokens=1))
    b = req("b", PREFIX + [2])
    sched.add_request(b)
    _, finished = step(sched)
    assert [r.request_id for r in finished] == ["a"] and held(sched) == ["b"]
    out, _ = step(sched)  # a's blocks are free but still cached
    assert spans(out) == [("b", 24, 1)]
    drain(sched)


def test_computing_request_preempted_waiter_goes_first_under_priority():
    sched = make(num_blocks=8, budget=8, policy="priority")
    c = req("c", range(100, 108), max_tokens=12, priority=0)
    a = req("a", PREFIX[:16] + [1, 2], priority=5)
    b = req("b", PREFIX[:16] + [3, 4], priority=1)
    sched.add_request(c)
    step(sched)  # c's prompt
    sched.add_request(a)
    step(sched)  # a's first chunk
    sched.add_request(b)
    out, _ = step(sched)
    assert spans(out) == [("c", 9, 1), ("a", 7, 7)] and held(sched) == []  # no budget left to look at b
    out, _ = step(sched)
    assert spans(out) == [("c", 10, 1), ("a", 14, 4)] and held(sched) == ["b"]
    out, _ = step(sched)
    assert spans(out) == [("c", 11, 1), ("a", 18, 1)]  # b would fit only with a block more
    out, _ = step(sched)  # c needs a block: a ranks last and gives its own back
    assert out.preempted == [a] and spans(out) == [("c", 12, 1)]
    while c.status is RequestStatus.RUNNING:
        step(sched)
    # b outranks a: it starts first, with the blocks of a's prefix that c's growth left in the cache;
    # a waits one step for the block b computes, then hits it too.
    out, _ = step(sched)
    assert spans(out) == [("b", 12, 6)] and held(sched) == ["a"] and b.num_cached_tokens == 12
    out, _ = step(sched)
    assert spans(out) == [("b", 18, 1), ("a", 16, 4)]
    assert stats(sched) == (26 + 18 + 20, 12 + 16)  # a is counted again when it starts again
    drain(sched)


def test_computing_request_preempted_under_fcfs_resumes_first_and_waiter_still_hits():
    sched = make(num_blocks=8, budget=8)
    c = req("c", range(100, 108), max_tokens=20)
    a = req("a", PREFIX + [1, 2])
    b = req("b", PREFIX + [3, 4])
    sched.add_request(c)
    step(sched)
    sched.add_request(a)
    sched.add_request(b)
    preempted = False
    while b.status is RequestStatus.WAITING:
        out, _ = step(sched)
        preempted = preempted or a in out.preempted
    assert preempted and b.num_cached_tokens == 24
    drain(sched)


def test_priority_order_kept_among_held_and_unheld():
    sched = make(policy="priority")
    sched.add_request(req("c", range(60, 69), priority=2))
    sched.add_request(req("x", PREFIX[:8] + [1], priority=0))
    sched.add_request(req("d", PREFIX[:8] + [3], priority=1))
    sched.add_request(req("b", PREFIX[:8] + [2], priority=0))
    assert [r.request_id for r in sched.waiting] == ["x", "b", "d", "c"]
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["x", "c"] and held(sched) == ["b", "d"]
    out, _ = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["x", "c", "b", "d"]
    drain(sched)


def test_kv_cache_full_with_a_held_request_does_not_deadlock():
    sched = make(num_blocks=8, budget=32)
    a, b = req("a", PREFIX[:8] + [1], max_tokens=6), req("b", PREFIX[:8] + [2], max_tokens=6)
    c, d = req("c", range(60, 76), max_tokens=6), req("d", range(80, 88), max_tokens=6)
    for r in (a, b, c, d):
        sched.add_request(r)
    out, _ = step(sched)  # b is held and skipped; d does not fit next to a and c: admission stops there
    assert spans(out) == [("a", 0, 9), ("c", 0, 16)] and held(sched) == ["b"]
    out, _ = step(sched)  # a's blocks are cached, but the block b needs more is not free: b waits, unheld
    assert spans(out) == [("a", 9, 1), ("c", 16, 1)] and held(sched) == []
    for _ in range(30):
        if not sched.has_unfinished():
            break
        out, _ = step(sched)
        assert out.seqs
    assert b.num_cached_tokens == 8 and all(r.status is RequestStatus.FINISHED_LENGTH for r in (a, b, c, d))
    drain(sched)


def test_engine_same_step_shared_prefix_hits_and_greedy_outputs_unchanged(tmp_path):
    """All 16 prompts arrive at once; 4 prefixes of 32 tokens (8 blocks of 4): the 12 later requests of
    each prefix hit all of it (before holding, none did: all started in the first step)."""
    import random

    from server import LLM
    from server import SamplingParams as Params
    from server.demo import make_tiny_model

    path = make_tiny_model(tmp_path, "llama")
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 200) for _ in range(32)] for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(3, 200) for _ in range(5)] for i in range(16)]
    params = Params(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for caching in (True, False):
        llm = LLM(str(path), dtype="float32", max_model_len=128, block_size=4, max_num_seqs=16,
                  enable_prefix_caching=caching)
        results[caching] = [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
        pool = llm.engine.block_pool
        if caching:
            assert (pool.prefix_queries, pool.prefix_hits) == (16 * 37, 12 * 32)
        assert pool.usage == 0.0
        del llm
    assert results[True] == results[False]
    assert all(len(out) == 6 for out in results[True])


def test_pool_pending_and_next_uncached_hashes():
    pool = BlockPool(16, 4)
    a = req("a", PREFIX[:10])  # blocks 0, 1 full; tokens 8, 9 in a partial block
    assert pool.pending_block_hashes(a) == pool._hash_blocks(a, 2)
    a.num_computed_tokens = 5
    assert pool.pending_block_hashes(a) == a.block_hashes[1:2]
    a.num_computed_tokens = 8
    assert pool.pending_block_hashes(a) == []
    b = req("b", PREFIX[:8])  # block 1 holds the last token: never shared, so never waited for
    assert pool.next_uncached_hash(b, 0) == a.block_hashes[0]
    assert pool.next_uncached_hash(b, 4) is None
    assert pool.next_uncached_hash(req("c", PREFIX[:12]), 4) == a.block_hashes[1]
    assert pool.next_uncached_hash(req("d", PREFIX[:12], prompt_logprobs=0), 0) is None
    off = BlockPool(16, 4, enable_prefix_caching=False)
    assert off.pending_block_hashes(req("e", PREFIX)) == [] and off.next_uncached_hash(req("f", PREFIX), 0) is None
