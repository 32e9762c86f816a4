"""BlockPool: free list, ref counts, chained prefix hashes, LRU eviction. Plain ints, no torch."""

import os
import subprocess
import sys

import pytest

from server.request import Request, SamplingParams
from server.scheduler.kv_blocks import BlockPool

BS = 4


def req(rid, tokens, **params):
    return Request(rid, list(tokens), SamplingParams(**params))


def run_prefill(pool, r, num_tokens=None):
    """Allocate with cache hits and pretend the runner computed up to num_tokens (default: all but the last)."""
    blocks, cached = pool.get_computed_blocks(r)
    n = r.num_tokens if num_tokens is None else num_tokens
    assert pool.allocate(r, n, blocks)
    r.num_computed_tokens = n
    pool.cache_full_blocks(r)
    return blocks, cached


def check_pool(pool, requests=()):
    """Ref counts match the block tables of the live requests; the free list is the rest."""
    counts = [0] * pool.num_blocks
    for r in requests:
        for b in r.block_ids:
            counts[b] += 1
    assert counts == pool.ref_counts
    assert pool.num_free_blocks == sum(1 for c in counts if c == 0)
    assert set(pool._free) == {b for b, c in enumerate(counts) if c == 0}
    for h, b in pool._cached.items():
        assert pool._block_hash[b] == h
    assert sum(h is not None for h in pool._block_hash) == len(pool._cached)


def test_allocate_and_free():
    pool = BlockPool(8, BS)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    a = req("a", range(10))
    assert pool.allocate(a, 10)
    assert len(a.block_ids) == 3 and len(set(a.block_ids)) == 3
    assert pool.num_free_blocks == 5
    assert pool.usage == 3 / 8
    assert pool.allocate(a, 12)  # still within the third block
    assert len(a.block_ids) == 3
    assert pool.allocate(a, 13)
    assert len(a.block_ids) == 4
    check_pool(pool, [a])
    pool.free(a)
    assert a.block_ids == []
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    check_pool(pool)


def test_allocate_failure_changes_nothing():
    pool = BlockPool(4, BS)
    a = req("a", range(9))
    assert pool.allocate(a, 9)
    before = list(a.block_ids)
    b = req("b", range(100, 108))
    assert not pool.allocate(b, 8)
    assert b.block_ids == [] and pool.num_free_blocks == 1
    assert not pool.allocate(a, 17)
    assert a.block_ids == before and pool.num_free_blocks == 1
    assert pool.allocate(a, 16)
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    check_pool(pool, [a])


def test_block_zero_is_usable():
    pool = BlockPool(2, BS)
    a = req("a", range(8))
    assert pool.allocate(a, 8)
    assert sorted(a.block_ids) == [0, 1]


def test_shared_prefix_ref_counts():
    pool = BlockPool(10, BS)
    prompt = list(range(10))  # two full blocks, then two tokens
    a = req("a", prompt)
    run_prefill(pool, a)
    assert pool.num_cached_blocks == 2
    b = req("b", prompt + [50, 51])
    blocks, cached = run_prefill(pool, b)
    assert blocks == a.block_ids[:2] and cached == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    for blk in a.block_ids[:2]:
        assert pool.ref_counts[blk] == 2
    check_pool(pool, [a, b])
    pool.free(a)
    for blk in b.block_ids[:2]:
        assert pool.ref_counts[blk] == 1
    assert pool.num_free_blocks == 10 - 3  # b holds the two shared blocks and its own third
    check_pool(pool, [b])
    pool.free(b)
    assert pool.num_free_blocks == 10
    check_pool(pool)


def test_hits_only_full_blocks_never_last_token():
    pool = BlockPool(16, BS)
    a = req("a", range(8))  # exactly two blocks
    run_prefill(pool, a)
    pool.free(a)
    # Same 8 tokens: only the first block may hit, the last token must be recomputed.
    assert pool.get_computed_blocks(req("b", range(8)))[1] == 4
    # 9 tokens: both blocks hit, the ninth is computed.
    assert pool.get_computed_blocks(req("c", range(9)))[1] == 8
    # 7 tokens: one full block hits at most.
    assert pool.get_computed_blocks(req("d", range(7)))[1] == 4
    # 4 tokens: the single full block would cover the last token.
    assert pool.get_computed_blocks(req("e", range(4)))[1] == 0
    assert pool.get_computed_blocks(req("f", range(1)))[1] == 0


def test_partial_block_is_not_cached():
    pool = BlockPool(16, BS)
    a = req("a", range(6))
    run_prefill(pool, a)
    assert pool.num_cached_blocks == 1
    assert pool.get_computed_blocks(req("b", range(20)))[1] == 4


def test_only_computed_tokens_are_cached():
    pool = BlockPool(16, BS)
    a = req("a", range(12))
    assert pool.allocate(a, 12)
    a.num_computed_tokens = 3
    pool.cache_full_blocks(a)
    assert pool.num_cached_blocks == 0
    a.num_computed_tokens = 7
    pool.cache_full_blocks(a)
    assert pool.num_cached_blocks == 1
    a.num_computed_tokens = 12
    pool.cache_full_blocks(a)
    assert pool.num_cached_blocks == 3
    pool.cache_full_blocks(a)  # idempotent
    assert pool.num_cached_blocks == 3
    check_pool(pool, [a])


def test_chained_hashes():
    pool = BlockPool(16, BS)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(pool, a)
    pool.free(a)
    # The same second block after a different first block does not hit.
    assert pool.get_computed_blocks(req("b", [9, 9, 9, 9, 5, 6, 7, 8, 9]))[1] == 0
    # A different first block then the same: no hit either.
    assert pool.get_computed_blocks(req("c", [1, 2, 3, 0, 5, 6, 7, 8, 9]))[1] == 0
    # Same first block, different second: one block.
    assert pool.get_computed_blocks(req("d", [1, 2, 3, 4, 5, 6, 7, 0, 9]))[1] == 4
    assert pool.get_computed_blocks(req("e", [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]))[1] == 8


def test_hash_key_is_verified():
    pool = BlockPool(8, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    # Forge a collision: point b's first-block hash at a's block although the tokens differ.
    b = req("b", [7] * 9)
    pool._hash_blocks(b, 2)
    pool._cached[b.block_hashes[0]] = a.block_ids[0]
    assert pool.get_computed_blocks(b) == ([], 0)


def test_hashes_are_deterministic_across_processes():
    code = (
        "from server.request import Request, SamplingParams\n"
        "from server.scheduler.kv_blocks import BlockPool\n"
        "p = BlockPool(8, 4); r = Request('r', list(range(13)), SamplingParams())\n"
        "p._hash_blocks(r, 3); print(r.block_hashes)\n"
    )
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        outs.add(res.stdout)
    assert len(outs) == 1


def test_lru_eviction_order():
    pool = BlockPool(6, BS)
    reqs = [req(f"r{i}", [i] * 8) for i in range(3)]  # 2 full blocks each
    for r in reqs:
        run_prefill(pool, r, 8)
    assert pool.num_free_blocks == 0 and pool.num_cached_blocks == 6
    for r in reqs:
        pool.free(r)  # r0 first: its blocks are the least recently used
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 6
    hit = lambda i: pool.get_computed_blocks(req("q", [i] * 9))[1]  # noqa: E731
    new = req("new", range(100, 104))
    assert pool.allocate(new, 4)  # one block: r0's tail block (freed last-to-first) goes first
    assert [hit(i) for i in range(3)] == [4, 8, 8]
    assert pool.allocate(new, 8)
    assert [hit(i) for i in range(3)] == [0, 8, 8]
    assert pool.allocate(new, 12)
    assert [hit(i) for i in range(3)] == [0, 4, 8]
    check_pool(pool, [new])


def test_uncached_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4, BS)
    a = req("a", range(8))
    run_prefill(pool, a, 8)
    assert pool.num_cached_blocks == 2
    junk = req("junk", range(50, 58))
    assert pool.allocate(junk, 8)  # never computed: holds nothing
    pool.free(a)
    pool.free(junk)
    b = req("b", range(200, 208))
    assert pool.allocate(b, 8)
    assert pool.num_cached_blocks == 2  # the junk blocks were taken
    assert pool.get_computed_blocks(req("c", range(9)))[1] == 8


def test_reused_block_leaves_hash_table():
    pool = BlockPool(2, BS)
    a = req("a", range(5))
    run_prefill(pool, a)
    cached_block = a.block_ids[0]
    pool.free(a)
    assert pool.is_cached(cached_block)
    b = req("b", range(100, 108))
    assert pool.allocate(b, 8)
    assert cached_block in b.block_ids
    assert not pool.is_cached(cached_block)
    assert pool.num_cached_blocks == 0
    assert pool.get_computed_blocks(req("c", range(5))) == ([], 0)
    check_pool(pool, [b])


def test_touching_cached_free_block():
    pool = BlockPool(4, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    pool.free(a)
    assert pool.num_free_blocks == 4
    b = req("b", list(range(9)) + [1, 2, 3])
    blocks, cached = pool.get_computed_blocks(b)
    assert cached == 8
    # Needs 4 blocks: 2 cached (leaving the free list) + 2 new; there are only 4 blocks in all.
    assert pool.allocate(b, 13, blocks)  # 13 tokens -> 4 blocks: fits exactly
    assert pool.num_free_blocks == 0
    assert b.block_ids[:2] == blocks
    assert all(pool.ref_counts[x] == 1 for x in b.block_ids)
    check_pool(pool, [b])


def test_computed_blocks_count_against_free_space():
    pool = BlockPool(4, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    pool.free(a)
    b = req("b", list(range(9)) + list(range(50, 58)))  # 17 tokens -> 5 blocks > 4
    blocks, cached = pool.get_computed_blocks(b)
    assert cached == 8
    assert not pool.allocate(b, 17, blocks)
    assert b.block_ids == [] and pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    assert all(c == 0 for c in pool.ref_counts)
    # The cached blocks were not evicted by the failed attempt.
    assert pool.get_computed_blocks(req("c", range(9)))[1] == 8
    check_pool(pool)


def test_computed_blocks_need_empty_table():
    pool = BlockPool(4, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    b = req("b", range(9))
    assert pool.allocate(b, 1)
    with pytest.raises(ValueError):
        pool.allocate(b, 9, a.block_ids[:1])


def test_duplicate_content_keeps_first_mapping():
    pool = BlockPool(8, BS)
    a = req("a", range(9))
    b = req("b", range(9))
    # Both miss (nothing cached yet), then both compute the same blocks.
    assert pool.get_computed_blocks(a)[1] == 0 and pool.get_computed_blocks(b)[1] == 0
    assert pool.allocate(a, 9) and pool.allocate(b, 9)
    a.num_computed_tokens = b.num_computed_tokens = 9
    pool.cache_full_blocks(a)
    pool.cache_full_blocks(b)
    assert pool.num_cached_blocks == 2
    assert pool.get_computed_blocks(req("c", range(9)))[0] == a.block_ids[:2]
    assert not pool.is_cached(b.block_ids[0])
    a_blocks = a.block_ids[:2]
    pool.free(a)
    pool.free(b)
    assert pool.num_free_blocks == 8
    assert pool.get_computed_blocks(req("d", range(9)))[0] == a_blocks
    check_pool(pool)


def test_prefix_caching_disabled():
    pool = BlockPool(8, BS, enable_prefix_caching=False)
    a = req("a", range(9))
    run_prefill(pool, a)
    assert pool.num_cached_blocks == 0
    assert pool.get_computed_blocks(req("b", range(9))) == ([], 0)
    assert pool.prefix_queries == 0 and pool.prefix_hits == 0


def test_prompt_logprobs_skip_cache():
    pool = BlockPool(8, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    assert pool.get_computed_blocks(req("b", range(9), prompt_logprobs=1)) == ([], 0)
    assert pool.get_computed_blocks(req("c", range(9)))[1] == 8


def test_stats_counters():
    pool = BlockPool(8, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    assert (pool.prefix_queries, pool.prefix_hits) == (9, 0)
    pool.get_computed_blocks(req("b", range(10)))
    assert (pool.prefix_queries, pool.prefix_hits) == (19, 8)


def test_reset_prefix_cache():
    pool = BlockPool(8, BS)
    a = req("a", range(9))
    run_prefill(pool, a)
    b = req("b", range(100, 109))
    run_prefill(pool, b)
    pool.free(b)
    pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0
    assert pool.get_computed_blocks(req("c", range(9))) == ([], 0)
    assert pool.get_computed_blocks(req("d", range(100, 109))) == ([], 0)
    check_pool(pool, [a])
    pool.free(a)
    assert pool.num_free_blocks == 8


def test_preempted_request_hits_its_own_blocks():
    pool = BlockPool(8, BS)
    a = req("a", range(6))
    run_prefill(pool, a)
    a.all_token_ids += [70, 71, 72]  # decoded three tokens
    assert pool.allocate(a, 9)
    a.num_computed_tokens = 8
    pool.cache_full_blocks(a)
    pool.free(a)  # preempted
    a.num_computed_tokens = 0
    blocks, cached = pool.get_computed_blocks(a)
    assert cached == 8
    assert pool.allocate(a, 9, blocks)
    check_pool(pool, [a])


def test_cache_salt_isolates_prefixes():
    pool = BlockPool(16, BS)
    tokens = list(range(1, 14))  # 3 full blocks before the last token
    a = req("a", tokens, cache_salt="tenant-a")
    run_prefill(pool, a)
    assert pool.get_computed_blocks(req("b", tokens, cache_salt="tenant-b"))[1] == 0
    assert pool.get_computed_blocks(req("plain", tokens))[1] == 0
    same = req("a2", tokens, cache_salt="tenant-a")
    assert pool.get_computed_blocks(same)[1] == 12  # the same salt shares every full block
    plain = req("p", tokens)
    run_prefill(pool, plain)
    assert pool.get_computed_blocks(req("p2", tokens))[1] == 12
    assert pool.get_computed_blocks(req("c", tokens, cache_salt="tenant-c"))[1] == 0
