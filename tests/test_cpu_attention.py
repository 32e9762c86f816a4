"""The CPU (batched) attention's own paths against the reference: decode chunks sized to a byte budget,
and prefill that attends to the step's K/V in hand. Contexts are real sizes (head dim 64, up to 1024
tokens) so that a step splits into several decode chunks without shrinking the budget."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import random_step

from kernels import batched, reference

HEAD_DIM = 64

LONG_DECODES = [(1, 1000), (1, 5), (1, 1024), (1, 333), (1, 700), (1, 17)]
MIXED = [(1, 900), (40, 40), (1, 1), (5, 50), (1, 640), (16, 16), (24, 1000)]  # prefix of 45 ends mid-block


def _step(lens, block_size, heads, dtype, seed=0):
    """Caches filled with random values, this step's K/V written at its slots as the layer does."""
    num_q, num_kv = heads
    num_blocks = sum(-(-s // block_size) for _, s in lens) + 4
    meta = random_step(seed, block_size, num_blocks, lens)
    gen = torch.Generator().manual_seed(seed + 1)
    k_cache = torch.randn(num_blocks, block_size, num_kv, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv, HEAD_DIM, generator=gen).to(dtype)
    tokens = sum(q for q, _ in lens)
    q = torch.randn(tokens, num_q, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(tokens, num_kv, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(tokens, num_kv, HEAD_DIM, generator=gen).to(dtype)
    reference.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    return meta, q, k, v, k_cache, v_cache


def test_long_decodes_split_into_chunks_within_the_budget_covering_every_row_once():
    meta, _, _, _, k_cache, _ = _step(LONG_DECODES, 16, (8, 4), torch.float32)
    plan = batched.plan_decode(meta)
    chunks = list(batched._decode_chunks(plan, k_cache))
    assert len(chunks) > 1
    assert torch.equal(torch.cat([c.rows for c in chunks]), plan.rows)
    block_bytes = 2 * k_cache[0].numel() * k_cache.element_size()
    for chunk in chunks:
        assert chunk.max_len >= int(chunk.seq_lens.max()) > chunk.max_len - 16  # padded to its own longest only
        assert chunk.block_tables.shape == (chunk.rows.shape[0], chunk.max_len // 16)
        assert chunk.rows.shape[0] == 1 or chunk.rows.shape[0] * plan.max_len // 16 * block_bytes <= batched.DECODE_CHUNK_BYTES


def test_a_small_decode_batch_is_one_chunk():
    meta, _, _, _, k_cache, _ = _step([(1, 40), (1, 9)], 16, (8, 4), torch.float32)
    plan = batched.plan_decode(meta)
    assert list(batched._decode_chunks(plan, k_cache)) == [plan]


@pytest.mark.parametrize("lens", [LONG_DECODES, MIXED])
@pytest.mark.parametrize("heads", [(8, 4), (9, 3), (4, 4)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window, softcap", [(None, None), (100, None), (None, 2.0)])
def test_batched_matches_reference_with_the_steps_kv_in_hand(lens, heads, block_size, window, softcap):
    meta, q, k, v, k_cache, v_cache = _step(lens, block_size, heads, torch.float32)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125, window, softcap)
    got = batched.paged_attention(q, k_cache, v_cache, meta, 0.125, window, softcap, k=k, v=v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    without_kv = batched.paged_attention(q, k_cache, v_cache, meta, 0.125, window, softcap)
    torch.testing.assert_close(without_kv, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(8, 4), (9, 3), (4, 4)])  # (4, 4): the single query row per KV head, doubled
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_batched_in_bfloat16_is_within_bfloat16_rounding_of_the_float32_reference(heads, softcap):
    """bfloat16 inputs; the reference computes on them in float32. 2e-2 absolute on outputs of size ~1
    (bfloat16 keeps 8 bits of mantissa, ~4e-3 relative per rounding, a few roundings deep)."""
    meta, q, k, v, k_cache, v_cache = _step(MIXED, 16, heads, torch.bfloat16)
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, 0.125, None, softcap)
    got = batched.paged_attention(q, k_cache, v_cache, meta, 0.125, None, softcap, k=k, v=v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_whole_prompt_reads_the_steps_kv_and_a_later_chunk_reads_the_cache_injected_mismatch():
    """A fault injected on purpose: the cache holds other values than the K/V passed in. A whole-prompt
    prefill must follow the K/V in hand, a chunk over a cached prefix and a decode the cache."""
    lens = [(40, 40), (5, 50), (1, 30)]
    meta, q, k, v, k_cache, v_cache = _step(lens, 16, (8, 4), torch.float32)
    stale_k, stale_v = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(k + 1, v - 1, stale_k, stale_v, meta.slot_mapping)  # the cache no longer agrees
    got = batched.paged_attention(q, stale_k, stale_v, meta, 0.125, k=k, v=v)
    from_hand = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
    from_cache = reference.paged_attention(q, stale_k, stale_v, meta, 0.125)
    torch.testing.assert_close(got[:40], from_hand[:40], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[40:], from_cache[40:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(from_hand[:40], from_cache[:40], atol=1e-3)
